"""GPU readiness in one command: the bf16 demo job on the GPU, a DP-SGD round on the GPU, and bf16
LoRA training speed next to Hugging Face's Trainer on the same model and data.

    python benchmarks/gpu_check.py                     # on a CUDA machine (about 5 min on one GPU)
    python benchmarks/gpu_check.py --device cpu        # the same checks on the CPU (smoke test)

1. **Demo job, bf16**: ``nvflare_jobs/flora/job.py --dtype bfloat16`` in FLARE's simulator, every
   site on the device (the client script trains on ``cuda`` whenever one is visible). Passes when
   the job completes and every round's sites report one base digest (bit-identical merged bf16
   weights, docs/design.md).
2. **DP-SGD round** (Opacus, the site's own training loop) on the device: passes when the noise
   generator lives on the parameters' device and the ledger holds exactly the steps taken.
3. **Speed**: bf16 base, LoRA rank 8 on q/v (float32 factors), ``--steps`` steps of batch
   ``--batch-size`` x ``--max-length`` tokens: input tokens per second of flare-lora's loop
   (``train_lora``) and of ``transformers.Trainer`` (bf16 autocast, same model, records, batches and
   learning rate), after one warm-up step each. flare-lora computes logits only at the supervised
   (answer) tokens, Trainer at every position, so the gap grows with the vocabulary.

Exit status 0 when checks 1 and 2 pass. Nothing here is needed to use flare-lora without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def records(n: int, max_length: int) -> list[dict]:
    words = " ".join(f"word{i}" for i in range(max_length))  # cut at max_length: every batch is full
    return [{"instruction": f"Summarise note {i}: {words}", "input": "", "output": f"summary {i}"} for i in range(n)]


def demo_job(args, out: Path) -> bool:
    cmd = [sys.executable, str(ROOT / "nvflare_jobs" / "flora" / "job.py"), "--dtype", "bfloat16",
           "--rounds", str(args.rounds), "--workspace", str(out / "ws"), "--results", str(out / "results")]
    cmd += ["--model", args.model] if args.model else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"[1] demo job FAILED (exit {proc.returncode}) after {seconds:.0f} s:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return False
    log = json.loads((out / "results" / "metrics.json").read_text())
    digests = [{s.get("base_digest") for s in r["sites"].values()} for r in log["rounds"]]
    same = bool(digests) and all(len(d) == 1 and None not in d for d in digests)
    losses = [round(min(s["metrics"]["eval_loss"] for s in r["sites"].values()), 4) for r in log["rounds"]]
    print(f"[1] demo job bf16 on {args.device}: {'ok' if same else 'FAILED'} in {seconds:.0f} s; "
          f"{len(log['rounds'])} rounds, best site eval loss per round {losses}, one base digest per round: {same}")
    return same


def site_model(args, dtype: str):
    from flare_lora.components.flare.client_train import load_model
    from flare_lora.components.training.config import SiteConfig
    from flare_lora.components.training.lora import add_lora

    cfg = SiteConfig.from_dict({"rank": 8, "alpha": 16, "local_steps": args.steps, "batch_size": args.batch_size,
                                "max_length": args.max_length, "dtype": dtype, "lr": 1e-4}, "gpu-check")
    model, tokenizer = load_model(args.model, cfg)
    return add_lora(model, cfg).to(args.device), tokenizer, cfg


def dp_round(args) -> bool:
    from flare_lora.privacy.dp_sgd import DPSGD
    from flare_lora.components.training.trainer import train_lora

    model, tokenizer, cfg = site_model(args, "bfloat16")
    data = records(64, args.max_length)
    cfg = cfg.__class__.from_dict({**cfg.to_dict(), "dp_noise_multiplier": 1.0, "dp_max_grad_norm": 1.0,
                                   "local_steps": 4}, "gpu-check")
    dp = DPSGD(cfg, len(data), site="gpu-check")
    params = [p for p in model.parameters() if p.requires_grad]
    session = dp.session(model, torch.optim.SGD(params, lr=0.0), len(data), cfg)
    on_device = session.optimizer.generator.device == params[0].device
    session.close()
    try:
        stats = train_lora(model, tokenizer, data, cfg, desc="dp-sgd", dp=dp)
    except Exception as e:  # noqa: BLE001 - the check reports any failure
        print(f"[2] DP-SGD round on {args.device}: FAILED: {type(e).__name__}: {e}; ledger steps {dp.ledger.steps}")
        return False
    ok = on_device and dp.ledger.steps == cfg.local_steps
    print(f"[2] DP-SGD round on {args.device}: {'ok' if ok else 'FAILED'}; noise generator on "
          f"{session.optimizer.generator.device}, parameters on {params[0].device}; ledger steps {dp.ledger.steps} "
          f"of {cfg.local_steps}; ε = {stats['dp']['epsilon']:.3f} at δ = {dp.delta:g}")
    return ok


def ours_tokens_per_s(args) -> float:
    from flare_lora.components.training.trainer import train_lora

    model, tokenizer, cfg = site_model(args, "bfloat16")
    data = records(64, args.max_length)
    train_lora(model, tokenizer, data, cfg.__class__.from_dict({**cfg.to_dict(), "local_steps": 1}, "warm"), desc="warm-up")
    sync()
    stats = train_lora(model, tokenizer, data, cfg, desc="flare-lora")
    sync()
    return stats["input_tokens"] / stats["seconds"]


def trainer_tokens_per_s(args) -> float:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from flare_lora.components.data.prompts import collate, encode

    model, tokenizer, cfg = site_model(args, "bfloat16")
    data = [encode(tokenizer, r, cfg.max_length) for r in records(64, args.max_length)]
    counted = []

    def collator(batch):
        out = collate(batch, tokenizer.pad_token_id)
        counted.append(int(out["attention_mask"].sum()))
        return out

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, per_device_train_batch_size=cfg.batch_size,
                                  max_steps=cfg.local_steps + 1, learning_rate=cfg.lr, bf16=args.device == "cuda",
                                  use_cpu=args.device == "cpu", report_to=[], save_strategy="no", logging_strategy="no",
                                  dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
        trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=collator)
        begins, ends = [], []

        class StepClock(TrainerCallback):
            def on_step_begin(self, *a, **k):
                sync()
                begins.append(time.perf_counter())

            def on_step_end(self, *a, **k):
                sync()
                ends.append(time.perf_counter())

        trainer.add_callback(StepClock())
        trainer.train()
    seconds = ends[-1] - begins[1]  # from the second step on: the first warms up
    tokens = sum(counted[1 : cfg.local_steps + 1])
    return tokens / seconds


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--model", default=None, help="local model dir (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--rounds", type=int, default=3, help="demo job rounds")
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--out", type=Path, default=None, help="folder for the demo job (default: a new temporary one)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device visible; run this on a GPU machine (--device cpu runs the same checks on the CPU)",
              file=sys.stderr)
        return 2
    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    out = args.out or Path(tempfile.mkdtemp(prefix="flare_lora_gpu_check_"))
    ok = demo_job(args, out)
    ok = dp_round(args) and ok
    ours, theirs = ours_tokens_per_s(args), trainer_tokens_per_s(args)
    print(f"[3] bf16 LoRA r=8 q/v, batch {args.batch_size} x {args.max_length} tokens, {args.steps} steps on {args.device}: "
          f"flare-lora {ours:,.0f} input tokens/s, transformers.Trainer {theirs:,.0f} input tokens/s "
          f"(ratio {ours / theirs:.2f})")
    print("all checks passed" if ok else "a check FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
