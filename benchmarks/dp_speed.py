"""DP-SGD cost: seconds per training step with Opacus (each clipping mode) over the same loop without DP.

SmolLM2-135M-Instruct (the embedded model, ``resolve_model_dir(None)``), LoRA rank 8 on q_proj and
v_proj, one torch thread, the project's ``train_lora`` on both sides (the DP side adds
``dp=DPSGD(...)``). The site holds exactly ``--batch`` AG News records, so DP's Poisson sampling
rate is q = 1 and every step, with or without DP, processes the same records: step times compare
like for like. The time is CPU time of this process (``time.process_time``; one thread), which
other sessions on a shared machine barely disturb; wall time is printed as well. The modes run
interleaved, ``--reps`` times ``--steps`` steps each, and each mode's time is the median of its runs.

    python benchmarks/dp_speed.py                          # all four Opacus modes
    python benchmarks/dp_speed.py --modes hooks --reps 2   # quicker
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import ag_news_records  # noqa: E402  (the quality benchmark's AG News loader)

from flare_lora.components.training.config import SiteConfig  # noqa: E402
from flare_lora.components.training.lora import add_lora  # noqa: E402
from flare_lora.components.training.models import load_model_and_tokenizer, resolve_model_dir  # noqa: E402
from flare_lora.components.training.trainer import set_threads, train_lora  # noqa: E402
from flare_lora.privacy.dp_sgd import DPSGD  # noqa: E402

MODES = ("hooks", "functorch", "ghost", "fast")


def step_seconds(model, tokenizer, records, cfg: SiteConfig, mode: str | None) -> tuple[float, float]:
    """(CPU, wall) seconds per step of one train_lora call (None: without DP)."""
    dp = None
    if mode is not None:
        cfg = replace(cfg, dp_noise_multiplier=1.0, dp_clipping=mode, dp_delta=0.1)  # δ < 1/N for N = batch
        dp = DPSGD(cfg, len(records), noise_seed=0)
    cpu = time.process_time()
    stats = train_lora(model, tokenizer, records, cfg, desc=mode or "no DP", dp=dp)
    cpu = time.process_time() - cpu
    assert dp is None or stats["dp"]["sample_rate"] == 1.0
    return cpu / cfg.local_steps, stats["seconds"] / cfg.local_steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="steps per timed run")
    p.add_argument("--reps", type=int, default=3, help="interleaved runs per mode")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=112)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--out", type=Path, default=Path("/tmp/flare_lora_dp_speed.json"))
    args = p.parse_args(argv)
    set_threads(1)
    model, tokenizer = load_model_and_tokenizer(resolve_model_dir(None))
    cfg = SiteConfig(local_steps=args.steps, batch_size=args.batch, max_length=args.max_length, threads=1)
    model = add_lora(model, cfg, "bench")
    records = ag_news_records(tokenizer, args.max_length)[: args.batch]
    step_seconds(model, tokenizer, records, replace(cfg, local_steps=1), None)  # warm-up
    names = ["no DP", *args.modes]
    cpu: dict[str, list[float]] = {name: [] for name in names}
    wall: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.reps):
        for name in names:
            c, w = step_seconds(model, tokenizer, records, cfg, None if name == "no DP" else name)
            cpu[name].append(c)
            wall[name].append(w)
            print(json.dumps({"rep": rep, "mode": name, "cpu_s_per_step": c, "wall_s_per_step": w}), flush=True)
    base_cpu, base_wall = statistics.median(cpu["no DP"]), statistics.median(wall["no DP"])
    print(f"\nSmolLM2-135M, LoRA r={cfg.rank} {cfg.target_modules}, batch {args.batch} AG News records "
          f"(DP q = 1), median of {args.reps} runs x {args.steps} steps, 1 thread")
    print("| mode | CPU s / step | CPU runs | DP / no-DP (CPU) | wall s / step | DP / no-DP (wall) |")
    print("|---|---|---|---|---|---|")
    for name in names:
        c, w = statistics.median(cpu[name]), statistics.median(wall[name])
        runs = ", ".join(f"{t:.2f}" for t in cpu[name])
        print(f"| {name} | {c:.2f} | {runs} | {c / base_cpu:.2f} | {w:.2f} | {w / base_wall:.2f} |")
    times = {"cpu": cpu, "wall": wall}
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "times": times}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
