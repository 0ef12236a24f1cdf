"""The quality study: every aggregation method on AG News, over 3 and 10 label-skewed sites, with
95 % confidence intervals over seeds and the bytes each method moved.

    python benchmarks/quality_study.py                   # sized for <= 2 h on 2 CPU cores; resumable
    python benchmarks/quality_study.py --quick           # tiny random model, a few minutes (harness check)
    python benchmarks/quality_study.py --device cuda --threads 1   # the same study on a GPU

Each run is the in-process protocol of benchmarks/quality.py (``run_federated``: real models, the
strategies' server and client halves, real TenSEAL for shared-A under HE). Settings:

- ``3hom``: 3 sites, ranks (8, 8, 8); ``3het``: ranks (4, 8, 16); ``10het``: 10 sites, ranks
  (64, 32, 16, 8, 4) twice; ``3div``: ranks (4, 8, 16) with 3x the local steps at 2x the learning
  rate, meant to let the sites' A's move far from their start (the case stacking's exactness is for).
- Rows: FedIT (kept across rounds, equal ranks only), FLoRA (exact), FLoRA bounded
  (``--global-rank``: 16 for 3 sites, 64 for 10), hlora (NVIDIA FLARE's, global rank = the largest
  site rank), zero-pad, nested shared-A (plain, and under HE in ``3het``), centralised (one LoRA of
  the largest rank on the union, as many steps as all sites together), local only (each site alone;
  the mean over sites), and zero-shot.
- Evaluation: a fixed, label-balanced test set of ``--n-test`` records, disjoint from training;
  each label scored by its log-likelihood as the answer of the training prompt (one packed forward
  pass per record, ``multiple_choice.choice_picks``); accuracy, its difference to FLoRA's on the
  same seed (the same data split; paired, so the seed-to-seed swing cancels), and the accuracy
  weighted by each site's label mix.
- Bytes: everything the protocol moved in the run (uploads and downloads of every round; under HE
  the ciphertext wire size).

Results: ``--out`` (default /tmp/flare_lora_quality/study): results.json (saved after every run; a
rerun skips finished runs), results.md and study.png. Runs also record how far each site's A moved
per round and, for methods whose sites share A's start, what averaging the factors lost against the
exact sum; results.md tabulates these where the runs hold them.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402  (data, the in-process protocol and helpers)

from flare_lora.components.algorithms.merge import weights_digest  # noqa: E402
from flare_lora.components.data.prompts import IGNORE_INDEX, encode  # noqa: E402
from flare_lora.components.training.lora import add_lora, base_weights  # noqa: E402
from flare_lora.components.training.models import load_model_and_tokenizer, make_tiny_llama, resolve_model_dir  # noqa: E402
from flare_lora.components.training.multiple_choice import choice_picks  # noqa: E402
from flare_lora.components.training.trainer import set_threads, train_lora  # noqa: E402

FED = {  # row -> (method, options, he)
    "fedit": ("fedit", None, False), "flora": ("flora", None, False), "flora_bounded": ("flora", "bounded", False),
    "hlora": ("hlora", None, False), "zero_pad": ("zero_pad", None, False), "shared_a": ("shared_a", None, False),
    "shared_a_he": ("shared_a", None, True),
}
LABELS = {"fedit": "FedIT", "flora": "FLoRA", "flora_bounded": "FLoRA bounded", "hlora": "hlora (NVFlare)",
          "zero_pad": "zero-pad", "shared_a": "shared-A", "shared_a_he": "shared-A, HE", "central": "centralised",
          "local": "local only", "zero_shot": "zero-shot"}
SETTINGS = {  # name -> (ranks, bounded rank, local steps per round, lr factor, records per site (study), rows)
    "3hom": ((8, 8, 8), 16, 3, 1, 64, ("fedit", "flora", "hlora", "zero_pad", "shared_a", "central", "local")),
    "3het": ((4, 8, 16), 16, 3, 1, 64, ("flora", "flora_bounded", "hlora", "zero_pad", "shared_a", "shared_a_he")),
    "10het": ((64, 32, 16, 8, 4) * 2, 64, 2, 1, 32, ("flora", "flora_bounded", "hlora", "zero_pad", "shared_a", "central")),
    "3div": ((4, 8, 16), 16, 9, 2, 64, ("flora", "hlora", "zero_pad", "shared_a")),
}
PRESETS = {  # quick: every setting with 1 step per round and 8 records per site
    "study": dict(rounds=3, batch=4, max_length=96, lr=5e-4, n_test=400, eval_batch=16),
    "quick": dict(rounds=1, batch=2, max_length=96, lr=1e-3, n_test=16, eval_batch=8),
}
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


# --- evaluation -----------------------------------------------------------------------------


def label_scorer(labels: list[str]):
    """scorer(model, tokenizer, test, cfg, site_labels) for run_federated: each record's label is the
    one whose tokens (+ eos, as trained) have the highest log-likelihood after the training prompt."""

    def score(model, tokenizer, test, cfg, site_labels) -> dict:
        contexts, options = [], []
        for record in test:
            context, choices = None, []
            for label in labels:
                ids = encode(tokenizer, {**record, "output": label}, 10_000)
                first = next(i for i, t in enumerate(ids["labels"]) if t != IGNORE_INDEX)
                if context is not None and ids["input_ids"][:first] != context:
                    raise ValueError("the prompt tokenizes differently with another label")
                context = ids["input_ids"][:first]
                choices.append(ids["input_ids"][first:])
            contexts.append(context)
            options.append(choices)
        model.eval()
        picks = []
        for start in range(0, len(test), cfg.eval_batch_size):
            end = start + cfg.eval_batch_size
            picks += choice_picks(model, tokenizer, contexts[start:end], options[start:end])
        hits: dict[str, list[int]] = {}
        for pick, record in zip(picks, test, strict=True):
            hits.setdefault(record["label"], []).append(int(labels[pick] == record["label"]))
        per_label = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
        weighted = [sum(per_label[k] * n for k, n in mix.items()) / sum(mix.values()) for mix in site_labels]
        return {"accuracy": sum(map(sum, hits.values())) / len(test), "per_label": per_label,
                "site_weighted_accuracy": weighted, "n_test": len(test)}

    return score


# --- runs -----------------------------------------------------------------------------------


def setting_args(args, setting: str) -> argparse.Namespace:
    """The harness's arguments for one setting: its local steps, learning rate and records per site."""
    _, _, steps, lr_factor, n_train, _ = SETTINGS[setting]
    return argparse.Namespace(**{**vars(args), "steps": 1 if args.quick else steps, "lr": args.lr * lr_factor,
                                 "n_train": 8 if args.quick else n_train})


def run_single(args, model_dir, data, seed: int, parts: list[tuple[list[dict], int]], steps: int, scorer,
               device: str) -> list[dict]:
    """One LoRA per (records, rank), trained alone for ``steps`` steps: centralised (the union) or local only."""
    out = []
    for k, (train, rank) in enumerate(parts):
        model, tokenizer = load_model_and_tokenizer(model_dir)
        cfg = q.site_config(args, rank, seed * 1000003 + k, steps=steps)
        peft_model = add_lora(model, cfg, f"site-{k + 1}").to(device)
        stats = train_lora(peft_model, tokenizer, train, cfg, desc=f"alone {k} r={rank}")
        out.append({**scorer(peft_model, tokenizer, data["test"], cfg, data["site_labels"]),
                    "train_seconds": stats["seconds"]})
    return out


def run(args, model_dir, data, setting: str, row: str, seed: int, scorer, base_digest: str) -> dict:
    ranks, bound, _, _, _, _ = SETTINGS[setting]
    sargs = setting_args(args, setting)
    if row in FED:
        method, options, he = FED[row]
        options = {"rank": bound} if options == "bounded" else None
        out = q.run_federated(sargs, model_dir, data, seed, method, ranks, base_digest, options=options, he=he,
                              scorer=scorer, device=args.device)
        out["bytes"] = sum(sum(r["upload_bytes"]) + sum(r["download_bytes"]) for r in out["rounds"])
        return out
    steps = sargs.steps * sargs.rounds
    if row == "central":  # the largest rank on the union, as many steps as all sites together
        union = [r for site in data["sites"] for r in site]
        random.Random(seed).shuffle(union)
        single = run_single(sargs, model_dir, data, seed, [(union, max(ranks))], steps * len(ranks), scorer, args.device)
    else:  # local only: each site alone, on its own records at its own rank
        single = run_single(sargs, model_dir, data, seed, list(zip(data["sites"], ranks)), steps, scorer, args.device)
    return {"accuracy": statistics.mean(s["accuracy"] for s in single), "bytes": 0,
            "per_site_accuracy": [s["accuracy"] for s in single],
            "site_weighted_accuracy": [statistics.mean(x) for x in zip(*(s["site_weighted_accuracy"] for s in single))],
            "train_seconds": sum(s["train_seconds"] for s in single)}


# --- report ---------------------------------------------------------------------------------


def ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % t-interval over the values; nan for one value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def table(results: dict) -> list[dict]:
    rows = []
    zero = results["runs"].get("all/zero_shot/all")
    for setting, (ranks, _, _, _, _, names) in SETTINGS.items():
        for row in names:
            runs = {k.rsplit("/", 1)[1]: v for k, v in results["runs"].items() if k.rsplit("/", 1)[0] == f"{setting}/{row}"}
            if not runs:
                continue
            acc = [r["accuracy"] for _, r in sorted(runs.items())]
            mean, half = ci(acc)
            flora = {k.rsplit("/", 1)[1]: v["accuracy"] for k, v in results["runs"].items()
                     if k.rsplit("/", 1)[0] == f"{setting}/flora"}
            paired = [runs[seed]["accuracy"] - flora[seed] for seed in sorted(runs) if seed in flora]
            delta = ci(paired) if paired and row != "flora" else (math.nan, math.nan)
            rows.append({"setting": setting, "ranks": ranks, "row": row, "seeds": sorted(runs), "accuracy": acc,
                         "mean": mean, "ci": half, "delta": delta, "mb": statistics.mean(r["bytes"] for r in runs.values()) / 1e6,
                         "site_mean": statistics.mean(statistics.mean(r["site_weighted_accuracy"]) for r in runs.values()),
                         "train_s": statistics.mean(r.get("train_seconds", 0.0) for r in runs.values())})
    if zero:
        rows.append({"setting": "all", "ranks": (), "row": "zero_shot", "seeds": ["-"], "accuracy": [zero["accuracy"]],
                     "mean": zero["accuracy"], "ci": math.nan, "delta": (math.nan, math.nan), "mb": 0.0,
                     "site_mean": math.nan, "train_s": 0.0})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| setting | ranks | method | accuracy (mean ± 95 % CI) | per seed | − FLoRA, paired by seed | "
             "site-mix accuracy | MB moved / run | train s / run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci_text = "" if math.isnan(r["ci"]) else f" ± {r['ci']:.3f}"
        d_mean, d_half = r["delta"]
        delta = "" if math.isnan(d_mean) else f"{d_mean:+.3f}" + ("" if math.isnan(d_half) else f" ± {d_half:.3f}")
        ranks = ",".join(map(str, r["ranks"])) if len(r["ranks"]) <= 3 else "64,32,16,8,4 ×2"
        lines.append(f"| {r['setting']} | {ranks} | {LABELS[r['row']]} | {r['mean']:.3f}{ci_text} | "
                     f"{', '.join(f'{a:.3f}' for a in r['accuracy'])} | {delta} | "
                     f"{'—' if math.isnan(r['site_mean']) else format(r['site_mean'], '.3f')} | "
                     f"{r['mb']:.1f} | {r['train_s']:.0f} |")
    return "\n".join(lines) + "\n"


def divergence(results: dict) -> str:
    """How far the sites' A's moved in each round (‖ΔA‖/‖A‖, mean over sites and seeds) and what
    averaging the factors lost against the exact sum (quality.averaging_error; methods whose sites
    start from a shared A), for the runs that recorded them."""
    groups: dict[str, list[list]] = {}
    for key, run in results["runs"].items():
        rounds = run.get("rounds") if isinstance(run.get("rounds"), list) else []
        trained = [r for r in rounds if r.get("a_drift")]
        if trained:
            groups.setdefault(key.rsplit("/", 1)[0], []).append(trained)
    if not groups:
        return ""
    lines = ["| setting / method | seeds | A moved, per round | averaging error, per round |", "|---|---|---|---|"]
    for name, runs in groups.items():
        drift = [statistics.mean(statistics.mean(run[t]["a_drift"]) for run in runs) for t in range(len(runs[0]))]
        error = [statistics.mean(run[t]["averaging_error"] for run in runs) for t in range(len(runs[0]))
                 if all("averaging_error" in run[t] for run in runs)]
        lines.append(f"| {name} | {len(runs)} | {', '.join(f'{d:.3f}' for d in drift)} | "
                     f"{', '.join(f'{e:.3f}' for e in error) or '—'} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(settings) + 1, figsize=(4.2 * (len(settings) + 1), 4.2), squeeze=False)
    names = list(LABELS)
    colors = plt.get_cmap("tab10")
    zero = next((r["mean"] for r in rows if r["row"] == "zero_shot"), None)
    for ax, setting in zip(axes[0], settings):
        mine = [r for r in rows if r["setting"] == setting]
        for i, r in enumerate(mine):
            ax.bar(i, r["mean"], yerr=0 if math.isnan(r["ci"]) else r["ci"], color=colors(names.index(r["row"]) % 10),
                   alpha=0.85, capsize=3)
            ax.scatter([i] * len(r["accuracy"]), r["accuracy"], color="black", s=8, zorder=3)
        if zero is not None:
            ax.axhline(zero, color="grey", linestyle=":", linewidth=1)
        ax.set_xticks(range(len(mine)), [LABELS[r["row"]] for r in mine], rotation=40, ha="right", fontsize=7)
        ax.set_title(f"{setting} (dotted: zero-shot)" if zero is not None else setting, fontsize=9)
        ax.set_ylim(0, 1)
    ax = axes[0][-1]
    for r in rows:
        if r["mb"] > 0:
            ax.scatter(r["mb"], r["mean"], color=colors(names.index(r["row"]) % 10), s=18,
                       marker={"3hom": "o", "3het": "s", "10het": "^", "3div": "D"}[r["setting"]])
    shown = [n for n in names if any(r["row"] == n and r["mb"] > 0 for r in rows)]
    ax.legend(handles=[plt.Line2D([], [], color=colors(names.index(n) % 10), marker="o", linestyle="", label=LABELS[n])
                       for n in shown], fontsize=6, loc="best")
    ax.set_xscale("log")
    ax.set_xlabel("MB moved per run (log)")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy vs bytes (o 3hom, s 3het, ^ 10het, D 3div)", fontsize=8)
    axes[0][0].set_ylabel("test accuracy (label log-likelihood)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main -----------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random model and a few records: a harness check")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--rows", nargs="+", choices=list(LABELS), default=list(LABELS), help="a subset of the rows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dirichlet", type=float, default=0.5)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    for key, value in PRESETS["quick" if args.quick else "study"].items():
        setattr(args, key, value)
    args.out = args.out or Path("/tmp/flare_lora_quality") / ("study-quick" if args.quick else "study")
    args.max_new_tokens, args.client_order = 8, False
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.quick:
        model_dir = str(args.out / "tiny-llama")
        if not (Path(model_dir) / "config.json").is_file():
            make_tiny_llama(model_dir, q.TOKENIZER_DIR)
    else:
        model_dir = resolve_model_dir(None)
    config = {**{k: getattr(args, k) for k in (*PRESETS["study"], "dirichlet", "quick")},
              "settings": {k: list(v[:5]) for k, v in SETTINGS.items()}}
    config = json.loads(json.dumps(config))  # as results.json holds it (tuples are lists)
    path = args.out / "results.json"
    results = {"config": config, "runs": {}, "data": {}}
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("config") != config:
            raise SystemExit(f"{path} holds results for other settings; use another --out")
        results = old
    if not args.report_only:
        _, tokenizer = load_model_and_tokenizer(model_dir)
        base, _ = load_model_and_tokenizer(model_dir)
        base_digest = weights_digest(base_weights(base))
        del base
        scorer = label_scorer(sorted(q.AG_LABELS.values()))
        cache: dict = {}
        jobs = [(s, row, seed) for seed in args.seeds for s in args.settings for row in SETTINGS[s][5] if row in args.rows]
        jobs += [("all", "zero_shot", None)] if "zero_shot" in args.rows else []
        for setting, row, seed in jobs:
            key = f"{setting}/{row}/{'all' if seed is None else seed}"
            if key in results["runs"]:
                continue
            n_sites = len(SETTINGS[setting][0]) if setting in SETTINGS else 3
            sargs = setting_args(args, setting if setting in SETTINGS else "3hom")
            data = q.make_data("full", sargs, tokenizer, cache, args.seeds[0] if seed is None else seed, n_sites=n_sites)
            results["data"][f"{n_sites}/{seed}"] = {"site_labels": data["site_labels"],
                                                   "test_labels": dict(Counter(r["label"] for r in data["test"]))}
            q.log(f"run {key}")
            t0 = time.perf_counter()
            if row == "zero_shot":
                model, _ = load_model_and_tokenizer(model_dir)
                out = scorer(model.to(args.device), tokenizer, data["test"], q.site_config(sargs, 8, 0), data["site_labels"])
                out["bytes"] = 0
            else:
                out = run(args, model_dir, data, setting, row, seed, scorer, base_digest)
            out["wall_seconds"] = time.perf_counter() - t0
            results["runs"][key] = out
            q.save_json(path, results)
            q.log(f"done {key}: accuracy {out['accuracy']:.3f} ({out['wall_seconds']:.0f} s; total "
                  f"{time.perf_counter() - start:.0f} s)")
    rows = table(results)
    md = markdown(rows) + (f"\n{drift}" if (drift := divergence(results)) else "")
    (args.out / "results.md").write_text(md)
    plot(rows, args.out / "study.png")
    print(md)
    q.log(f"wrote {path}, results.md and study.png in {time.perf_counter() - start:.0f} s. The same study on a GPU: "
          f"python benchmarks/quality_study.py --device cuda --threads 1 --out {args.out}-gpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
