"""Utility vs ε: FLoRA (8,8,8) on AG News with Opacus DP-SGD at every site, ε ∈ {1, 4, 8, ∞}.

The quality benchmark's harness and data (benchmarks/quality.py, full mode: SmolLM2-135M, 3 sites
with Dirichlet(0.5) label skew, 96 records each, 2 rounds x 5 steps, batch 4, lr 5e-4, a fixed
60-record test set); each site trains with ``dp_epsilon`` = ε over its 10 planned steps
(σ from Opacus' RDP accountant, δ = 1e-5, C = --clip, Poisson rate q = 4/96). ε = ∞ is the same
run without DP (it reproduces quality.py's FLoRA (8,8,8) row for the seed). The DP noise is seeded
(``noise_seed``) so the benchmark reproduces; a FLARE site draws it from OS entropy.

    python benchmarks/dp_utility.py                  # one seed, ε = inf 8 4 1, ~15 min on 2 shared cores
    python benchmarks/dp_utility.py --report-only    # table + plot from the saved results

Results (resumable; runs already saved are skipped): --out/results.json, results.md, dp_utility.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402

from flare_lora.components.algorithms.merge import weights_digest  # noqa: E402
from flare_lora.components.training.lora import base_weights  # noqa: E402
from flare_lora.components.training.models import load_model_and_tokenizer, resolve_model_dir  # noqa: E402
from flare_lora.components.training.trainer import set_threads  # noqa: E402


def key(eps: float, seed: int) -> str:
    return f"eps={'inf' if math.isinf(eps) else f'{eps:g}'}/seed={seed}"


def markdown(results: dict) -> str:
    lines = ["| ε (per site, δ = 1e-5) | σ | test exact match | label accuracy | test answer loss | train s |",
             "|---|---|---|---|---|---|"]
    for name, run in sorted(results["runs"].items(), key=lambda kv: -kv[1]["epsilon_target"]):
        eps = run["epsilon_target"]
        sigma = "—" if not run.get("dp") else f"{run['dp'][0]['noise_multiplier']:.2f}"
        spent = "" if not run.get("dp") else f" (spent {max(d['epsilon'] for d in run['dp']):.2f})"
        label = "∞ (no DP)" if math.isinf(eps) else f"{eps:g}{spent}"
        lines.append(f"| {label} | {sigma} | {run['exact_match']:.3f} | {run['label_accuracy']:.3f} | "
                     f"{run['eval_loss']:.3f} | {run['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(results["runs"].values(), key=lambda r: r["epsilon_target"])
    finite = [r for r in runs if not math.isinf(r["epsilon_target"])]
    nodp = [r for r in runs if math.isinf(r["epsilon_target"])]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, label in ((axes[0], "exact_match", "test exact match"),
                              (axes[1], "eval_loss", "test answer loss (nats/token)")):
        ax.plot([r["epsilon_target"] for r in finite], [r[metric] for r in finite], "o-", label="DP-SGD at every site")
        for r in nodp:
            ax.axhline(r[metric], color="gray", ls="--", label="no DP (ε = ∞)")
        ax.set_xscale("log")
        ax.set_xlabel("ε per site (δ = 1e-5)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    c = results["config"]
    fig.suptitle(f"FLoRA (8,8,8), SmolLM2-135M, AG News: {c['rounds']} rounds x {c['steps']} steps, "
                 f"{c['n_train']} records/site, C = {c['clip']}, seed {c['seeds']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epsilons", type=float, nargs="+", default=[math.inf, 8.0, 4.0, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--clip", type=float, default=1.0, help="per-record clipping norm C")
    p.add_argument("--out", type=Path, default=Path("/tmp/flare_lora_dp_utility"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    qargs = quality.parse_args(["--mode", "full", "--threads", "1"])
    set_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    config = {k: getattr(qargs, k) for k in ("rounds", "steps", "batch", "max_length", "lr", "n_train", "n_test")}
    config.update(clip=args.clip, seeds=args.seeds, method="flora", ranks=[8, 8, 8], delta=1e-5)
    results = json.loads(path.read_text()) if path.is_file() else {"config": config, "runs": {}}
    if results["config"] != config:
        raise SystemExit(f"{path} holds results for other settings; use another --out")
    if not args.report_only:
        model_dir = resolve_model_dir(None)
        base, tokenizer = load_model_and_tokenizer(model_dir)
        base_digest = weights_digest(base_weights(base))
        del base
        cache: dict = {}
        for seed in args.seeds:
            data = quality.make_data("full", qargs, tokenizer, cache, seed)
            for eps in args.epsilons:
                name = key(eps, seed)
                if name in results["runs"]:
                    continue
                dp = None if math.isinf(eps) else {
                    "dp_epsilon": eps, "dp_planned_steps": qargs.rounds * qargs.steps, "dp_max_grad_norm": args.clip}
                t0 = time.perf_counter()
                out = quality.run_federated(qargs, model_dir, data, seed, "flora", (8, 8, 8), base_digest, dp=dp)
                out.update(epsilon_target=eps, seed=seed, wall_seconds=time.perf_counter() - t0)
                out.pop("rounds", None)
                results["runs"][name] = out
                path.write_text(json.dumps(results, indent=1, default=str))
                quality.log(f"{name}: exact match {out['exact_match']:.3f}, loss {out['eval_loss']:.3f} "
                            f"({out['wall_seconds']:.0f} s)")
    md = markdown(results)
    (args.out / "results.md").write_text(md)
    plot(results, args.out / "dp_utility.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
