"""Measured effect of a site's memory switches (``dtype``, ``gradient_checkpointing``) on one
LoRA training process: peak resident memory and speed.

    python benchmarks/memory_switches.py                        # SmolLM2-135M (embedded), CPU
    python benchmarks/memory_switches.py --model DIR --steps 8 --max-length 512 --batch-size 8

Each setting runs in a fresh process (the site's own loader, ``client_train.load_model``, then
LoRA rank 8 on q/v and ``--steps`` optimizer steps on long synthetic records that fill
``--max-length`` tokens) and reports host memory (Linux /proc): the peak while loading (a
bfloat16 load passes through the float32 file), what is resident after loading, and the peak
while training (weights + activations + allocator slack), plus input tokens per second. On a GPU
the same switches cut GPU memory; this script measures host memory where it runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

SETTINGS = [("float32", False), ("float32", True), ("bfloat16", False), ("bfloat16", True)]


def status_mb(key: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**10
    raise KeyError(key)


def run_one(args) -> dict:
    """One setting, in this process: what a site with these keys uses."""
    from flare_lora.components.flare.client_train import load_model
    from flare_lora.components.training.config import SiteConfig
    from flare_lora.components.training.lora import add_lora
    from flare_lora.components.training.trainer import train_lora

    cfg = SiteConfig.from_dict({"rank": 8, "alpha": 16, "local_steps": args.steps, "batch_size": args.batch_size,
                                "max_length": args.max_length, "threads": args.threads, "dtype": args.dtype,
                                "gradient_checkpointing": args.checkpointing}, "bench")
    model, tokenizer = load_model(args.model, cfg)
    model = add_lora(model, cfg)
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    loaded = status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to what is resident now
        f.write("5")
    words = " ".join(f"word{i}" for i in range(args.max_length))  # long enough to be cut at max_length
    records = [{"instruction": f"Repeat {i}: {words}", "input": "", "output": "ok"} for i in range(16)]
    stats = train_lora(model, tokenizer, records, cfg, desc=f"{args.dtype} ckpt={args.checkpointing}")
    return {"dtype": args.dtype, "gradient_checkpointing": args.checkpointing, "load_peak_mb": round(load_peak),
            "rss_after_load_mb": round(loaded), "train_peak_mb": round(status_mb("VmHWM")),
            "input_tokens": stats["input_tokens"],
            "input_tokens_per_s": round(stats["input_tokens"] / stats["seconds"], 1),
            "train_loss": round(stats["train_loss"], 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local model dir (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process: one setting
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    common = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
              "--threads", str(args.threads)] + (["--model", args.model] if args.model else [])
    print(f"LoRA rank 8 on q/v, {args.steps} steps x batch {args.batch_size} x {args.max_length} tokens, "
          f"{args.threads} threads")
    print(f"{'dtype':<9} {'ckpt':<5} {'load peak MB':>13} {'resident MB':>12} {'train peak MB':>14} "
          f"{'input tok/s':>12} {'loss':>8}")
    for dtype, checkpointing in SETTINGS:
        cmd = [sys.executable, __file__, "--one", "--dtype", dtype, *common] + (["--checkpointing"] * checkpointing)
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"{dtype:<9} {str(checkpointing):<5} {r['load_peak_mb']:>13} {r['rss_after_load_mb']:>12} "
              f"{r['train_peak_mb']:>14} {r['input_tokens_per_s']:>12} {r['train_loss']:>8}")


if __name__ == "__main__":
    main()
