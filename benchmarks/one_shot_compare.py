"""One-shot vs multi-round federated LoRA (FLoRA stacking), in-process, at equal and at tuned budgets.

The claim under test ("one communication round is all it needs"): one round of T·k local steps
matches T rounds of k steps. Every protocol here gets the same total local steps per site
(K = T·k) and the same data; T = 1 is one-shot. Besides equal settings, each protocol gets its
best learning rate from a grid (chosen on a validation split with seed 0, then used for every
seed): best vs best. Settings: 3 and 10 sites x two label-heterogeneity levels (Dirichlet α),
several seeds, plus a zero-shot row.

Sites are simulated with one shared model: under FLoRA every site holds the same base weights
(it merges every stacked round), so round r = for each site: a fresh LoRA from its own seed,
k local steps, upload; then the server stacks (``stack_lora``) and every site merges the stack.
Communication is counted from the tensors the protocol moves: each site's upload per round,
and the stacked round every site downloads before the next one (one-shot downloads nothing).

    python benchmarks/one_shot_compare.py --mode quick        # tiny random Llama, embedded tasks: minutes
    python benchmarks/one_shot_compare.py --mode full         # SmolLM2-135M, AG News (../shared/data)

Results: ``--out`` (default /tmp/flare_lora_one_shot/<mode>): results.json (every run, resumable),
results.md (table) and one_shot.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402  (AG News records, evaluation helpers)

from flare_lora.components.algorithms.merge import merge_rounds_into  # noqa: E402
from flare_lora.components.algorithms.stacking import stack_lora  # noqa: E402
from flare_lora.components.data.split import dirichlet_split  # noqa: E402
from flare_lora.components.data.synthetic import default_site_data  # noqa: E402
from flare_lora.components.training.config import SiteConfig  # noqa: E402
from flare_lora.components.training.lora import add_lora, base_weights, lora_state, reset_lora  # noqa: E402
from flare_lora.components.training.models import load_model_and_tokenizer, make_tiny_llama, resolve_model_dir  # noqa: E402
from flare_lora.components.training.trainer import evaluate, set_threads, train_lora  # noqa: E402

PRESETS = {
    "quick": dict(total_steps=4, batch=2, lr=1e-3, lr_grid=(1e-3, 3e-3), n_train=8, n_test=12, n_val=8,
                  max_length=96, sites=(3, 10), alphas=(0.3, 100.0), seeds=(0, 1), rounds=(1, 2, 4)),
    # sized for 2 shared CPU cores: 4 local steps of batch 2 per site in all, split over T rounds
    "full": dict(total_steps=4, batch=2, lr=5e-4, lr_grid=(5e-4, 1.5e-3), n_train=8, n_test=40, n_val=16,
                 max_length=112, sites=(3, 10), alphas=(0.3, 100.0), seeds=(0, 1), rounds=(1, 2, 4)),
}
RANK = 8


def make_data(args, tokenizer, cache: dict, n_sites: int, alpha: float, seed: int) -> dict:
    """{"sites": [records per site], "test": [...], "val": [...]}; test and val are seed-independent."""
    if args.mode == "quick":
        sites = [default_site_data(k % 3, n_train=args.n_train, n_eval=1, seed=seed * 100 + k)[0] for k in range(n_sites)]
        held = [r for k in range(3) for r in default_site_data(k, n_train=1, n_eval=args.n_test, seed=10_000)[1]]
        return {"sites": sites, "test": held[: args.n_test], "val": held[args.n_test : args.n_test + args.n_val]}
    if "ag" not in cache:
        records = q.ag_news_records(tokenizer, args.max_length)
        held = q.ag_news_test_indices(records, args.n_test + args.n_val)
        random.Random("one-shot-val").shuffle(held)
        taken = set(held)
        cache["ag"] = (records, [records[i] for i in held[: args.n_test]],
                       [records[i] for i in held[args.n_test :]], [i for i in range(len(records)) if i not in taken])
    records, test, val, pool = cache["ag"]
    labels = [records[i]["label"] for i in pool]
    rng = random.Random(f"one-shot-train:{n_sites}:{alpha}:{seed}")
    by_label: dict[str, list[int]] = {}
    for j, label in enumerate(labels):
        by_label.setdefault(label, []).append(pool[j])
    for indices in by_label.values():
        rng.shuffle(indices)
    sites = []
    for part in dirichlet_split(labels, n_sites, alpha, seed):
        counts = Counter(labels[j] for j in part) or Counter({sorted(by_label)[len(sites) % len(by_label)]: 1})
        total = sum(counts.values())
        site = []  # n_train records with the Dirichlet share's label mix
        for label in sorted(counts, key=lambda l: -counts[l]):
            take = min(round(args.n_train * counts[label] / total), args.n_train - len(site))
            site += [records[by_label[label].pop()] for _ in range(take)]
        while len(site) < args.n_train:
            site.append(records[by_label[max(counts, key=counts.get)].pop()])
        rng.shuffle(site)
        sites.append(site)
    return {"sites": sites, "test": test, "val": val}


def nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def run_protocol(args, model_dir, data, rounds: int, lr: float, seed: int, evaluate_on=("test",)) -> dict:
    """T rounds of FLoRA with K/T local steps each; returns metrics, bytes and seconds."""
    model, tokenizer = load_model_and_tokenizer(model_dir)
    steps = args.total_steps // rounds
    cfg = SiteConfig(rank=RANK, alpha=2.0 * RANK, lr=lr, local_steps=steps, batch_size=args.batch,
                     max_length=args.max_length, max_new_tokens=6, eval_batch_size=8, threads=args.threads, seed=seed)
    model = add_lora(model, cfg, "sim")
    up = down = 0
    t0 = time.perf_counter()
    losses = []
    for rnd in range(rounds):
        states = []
        for k, records in enumerate(data["sites"]):
            site_seed = seed * 1000003 + rnd * 1009 + k
            reset_lora(model, site_seed)  # FLoRA: a fresh LoRA every round, on the merged base
            stats = train_lora(model, tokenizer, records, dataclasses.replace(cfg, seed=site_seed),
                               desc=f"T={rounds} lr={lr:g} r{rnd} site {k}")
            losses.append(stats["train_loss"])
            states.append(lora_state(model))
            up += nbytes(states[-1])
        stacked = stack_lora(states, [len(s) for s in data["sites"]], [cfg.scaling] * len(states))
        merge_rounds_into(base_weights(model), [stacked])
        if rnd + 1 < rounds:  # every site downloads the stack to merge it before the next round
            down += nbytes(stacked) * len(states)
    reset_lora(model, 0)  # B = 0: the model is now exactly the merged base
    out = {"train_seconds": time.perf_counter() - t0, "upload_bytes": up, "download_bytes": down,
           "train_loss": sum(losses[-len(data["sites"]):]) / len(data["sites"])}
    for split in evaluate_on:
        result = evaluate(model, tokenizer, data[split], cfg)
        out[split] = {"exact_match": result["exact_match"], "eval_loss": result["eval_loss"]}
    return out


def summarize(results: dict, args) -> tuple[list[dict], str]:
    rows = []
    for n_sites in args.sites:
        for alpha in args.alphas:
            for kind in ("equal", "tuned"):
                for rounds in args.rounds:
                    runs = [results.get(f"{kind}:{n_sites}:{alpha}:{rounds}:{s}") for s in args.seeds]
                    if None in runs:
                        continue
                    em = [r["test"]["exact_match"] for r in runs]
                    loss = [r["test"]["eval_loss"] for r in runs]
                    rows.append({"sites": n_sites, "alpha": alpha, "kind": kind, "rounds": rounds,
                                 "lr": runs[0]["lr"], "em": em, "loss": loss,
                                 "bytes": runs[0]["upload_bytes"] + runs[0]["download_bytes"]})
    zs = results.get("zero_shot")
    lines = ["| sites | Dirichlet α | budget | protocol | lr | test exact match | test answer loss | up+down bytes (all sites) |",
             "|---|---|---|---|---|---|---|---|"]
    if zs:
        lines.append(f"| – | – | – | zero-shot | – | {zs['test']['exact_match']:.3f} | {zs['test']['eval_loss']:.3f} | 0 |")
    for r in rows:
        proto = "one-shot (T=1)" if r["rounds"] == 1 else f"T={r['rounds']} rounds"
        lines.append(f"| {r['sites']} | {r['alpha']:g} | {r['kind']} | {proto} | {r['lr']:g} | {_pm(r['em'])} | "
                     f"{_pm(r['loss'])} | {r['bytes'] / 1e6:.2f} MB |")
    return rows, "\n".join(lines)


def _pm(xs: list[float]) -> str:
    mean = sum(xs) / len(xs)
    return f"{mean:.3f} ± {(max(xs) - min(xs)) / 2:.3f}"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(r["sites"], r["alpha"]) for r in rows})
    fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.2), squeeze=False)
    for ax, (n_sites, alpha) in zip(axes[0], settings):
        for kind, marker in (("equal", "o"), ("tuned", "s")):
            sel = sorted((r for r in rows if (r["sites"], r["alpha"], r["kind"]) == (n_sites, alpha, kind)),
                         key=lambda r: r["rounds"])
            if sel:
                ax.errorbar([r["rounds"] for r in sel], [sum(r["loss"]) / len(r["loss"]) for r in sel],
                            yerr=[(max(r["loss"]) - min(r["loss"])) / 2 for r in sel], marker=marker, label=kind,
                            capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(PRESETS["full"]["rounds"]), [str(t) for t in PRESETS["full"]["rounds"]])
        ax.set_title(f"{n_sites} sites, α={alpha:g}")
        ax.set_xlabel("rounds T (same total local steps)")
        ax.set_ylabel("test answer loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=PRESETS, default="quick")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--sites", type=int, nargs="+", default=None)
    args = p.parse_args(argv)
    for key, value in PRESETS[args.mode].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    set_threads(args.threads)
    out = Path(args.out or f"/tmp/flare_lora_one_shot/{args.mode}")
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def save():
        results_path.write_text(json.dumps(results, indent=1))

    if args.mode == "quick":
        model_dir = str(make_tiny_llama(out / "tiny-llama", q.TOKENIZER_DIR))
    else:
        model_dir = resolve_model_dir(None)
    _, tokenizer = load_model_and_tokenizer(model_dir)
    cache: dict = {}
    started = time.perf_counter()
    if "zero_shot" not in results:
        data = make_data(args, tokenizer, cache, 3, args.alphas[0], 0)
        model, _ = load_model_and_tokenizer(model_dir)
        cfg = SiteConfig(max_length=args.max_length, max_new_tokens=6, threads=args.threads)
        result = evaluate(model, tokenizer, data["test"], cfg)
        results["zero_shot"] = {"test": {"exact_match": result["exact_match"], "eval_loss": result["eval_loss"]}}
        save()
    for n_sites in args.sites:
        for alpha in args.alphas:
            for rounds in args.rounds:
                # tune the learning rate on seed 0's validation split, then run every seed
                tune = {}
                for lr in args.lr_grid:
                    key = f"tune:{n_sites}:{alpha}:{rounds}:{lr}"
                    if key not in results:
                        data = make_data(args, tokenizer, cache, n_sites, alpha, 0)
                        q.log(f"{key}")
                        results[key] = dict(run_protocol(args, model_dir, data, rounds, lr, 0, ("val", "test")), lr=lr)
                        save()
                    tune[lr] = results[key]["val"]["eval_loss"]
                best = min(tune, key=tune.get)
                for seed in args.seeds:
                    for kind, lr in (("equal", args.lr), ("tuned", best)):
                        key = f"{kind}:{n_sites}:{alpha}:{rounds}:{seed}"
                        if key in results:
                            continue
                        reuse = results.get(f"tune:{n_sites}:{alpha}:{rounds}:{lr}") if seed == 0 else None
                        if reuse is None:
                            other = "tuned" if kind == "equal" else "equal"
                            twin = results.get(f"{other}:{n_sites}:{alpha}:{rounds}:{seed}")
                            reuse = twin if twin and twin["lr"] == lr else None
                        if reuse is None:
                            data = make_data(args, tokenizer, cache, n_sites, alpha, seed)
                            q.log(key)
                            reuse = dict(run_protocol(args, model_dir, data, rounds, lr, seed), lr=lr)
                        results[key] = reuse
                        save()
    rows, table = summarize(results, args)
    (out / "results.md").write_text(table + "\n")
    plot(rows, out / "one_shot.png")
    print(table)
    print(f"\n{len(results)} runs in {results_path}; this invocation {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
