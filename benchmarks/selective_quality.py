"""Quality of selective-layer fine-tuning: the solver vs top / bottom / random / full, equal budgets.

    python benchmarks/selective_quality.py --mode full      # SmolLM2-135M, AG News, <= 20 min on 2 shared cores
    python benchmarks/selective_quality.py --mode quick     # tiny random Llama, embedded tasks, ~1 min

In-process, no FLARE, but the project's code paths for everything a FLARE job runs: each site is
a :class:`flare_lora.components.flare.client_train.SelectiveSite` (score -> train the assigned layers ->
upload them -> restore the global layers), the server half is ``choose_layers`` (the solver or a
baseline), ``validate_layer_update`` and ``average_layers``. Full mode ("--layer-mode full"):
sites train their layers' full weights. All sites hold the global model between tasks (the
handler's invariant), so the simulation keeps one model in memory and points every site's
handler at it.

Setup (full): 3 sites with layer budgets 2 / 4 / 6 of SmolLM2-135M's 30 decoder layers; AG News
topic classification from the headline alone (title, no description: ~70-token prompts with the
chat template instead of ~110) as instructions, label-skewed over the sites (Dirichlet 0.5 split,
``--n-train`` records each), a label-balanced test set; R rounds of S local AdamW steps on the
layers' full weights. Every row gets the same budgets, data, steps and learning rate; "full"
trains every layer at every site (the budget-free reference). "selective" uses λ·N = 1,
"selective_lam3" λ·N = 3 ("selective_lam0", λ = 0, each site its own top-b_i, via --rows), all
scoring layers on one local batch per round. Metrics on the final global model: exact match and answer loss on the test set.

Shrunk to fit <= 20 min on 2 CPU cores shared with other jobs: 2 rounds x 4 steps of batch 2 per
site (16 examples per site in all), 24 test examples, 2 seeds (each its own split, test sample,
init and order), no zero-shot row by default (``--rows ... zero_shot`` adds it). At this size
differences of a few points of exact match are within noise; the answer loss separates rows
better. Under heavy contention from other jobs the same run took 4-5x longer.

Results go to ``--out`` (default /tmp/flare_lora_selective_quality/<mode>): results.json (saved
after every row; rows already there are skipped unless --fresh) and results.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from flare_lora.components.algorithms.layer_average import average_layers, layer_of, validate_layer_update
from flare_lora.components.algorithms.layer_selection import SCORED, choose_layers, normalize_scores
from flare_lora.components.algorithms.layer_solver import inconsistency
from flare_lora.components.data.prompts import encode
from flare_lora.components.data.split import dirichlet_split
from flare_lora.components.data.synthetic import default_site_data
from flare_lora.components.flare.client_train import SelectiveSite
from flare_lora.components.training.config import SiteConfig
from flare_lora.components.training.lora import add_lora, reset_lora
from flare_lora.components.training.models import load_model_and_tokenizer, make_tiny_llama, resolve_model_dir
from flare_lora.components.training.trainer import evaluate, set_threads

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FLARE_LORA_SHARED", ROOT.parent / "shared" / "data"))
TOKENIZER_DIR = SHARED / "smollm2-135m-instruct-q4_1"
AG_NEWS_CSV = SHARED / "ag_news_test" / "test.csv"
AG_LABELS = {"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"}
AG_INSTRUCTION = "Classify the topic of this news article as World, Sports, Business or Sci/Tech."

# row -> (criterion, λ·N); λ = λ·N / N
ROWS = {
    "zero_shot": (None, 0.0),
    "selective": ("selective", 1.0),
    "selective_lam0": ("selective", 0.0),
    "selective_lam3": ("selective", 3.0),
    "top": ("top", 0.0),
    "bottom": ("bottom", 0.0),
    "random": ("random", 0.0),
    "full": ("full", 0.0),
}
DEFAULT_ROWS = ["selective", "selective_lam3", "top", "bottom", "random", "full"]  # more: --rows
PRESETS = {
    "quick": dict(rounds=2, steps=3, batch=4, lr=1e-3, n_train=32, n_test=24, max_length=96, budgets="1,2,3",
                  score_batches=2, max_new_tokens=6),
    "full": dict(rounds=2, steps=4, batch=2, lr=1e-4, n_train=48, n_test=24, max_length=80, budgets="2,4,6",
                 score_batches=1, max_new_tokens=4),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ag_news(tokenizer, args, seed: int) -> dict:
    """3 label-skewed training sites and a balanced test set from the AG News CSV."""
    records = []
    with open(AG_NEWS_CSV, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            text = row["title"].strip().replace("\\", " ")  # headline only: short prompts, see the docstring
            record = {"instruction": AG_INSTRUCTION, "input": text, "output": AG_LABELS[row["label"]]}
            if len(encode(tokenizer, record, 10_000)["input_ids"]) <= args.max_length:
                records.append(record)
    rng = random.Random(f"selective-quality:{seed}")
    by_label: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_label.setdefault(r["output"], []).append(i)
    for indices in by_label.values():
        rng.shuffle(indices)
    per_label = args.n_test // len(by_label)
    test = [records[by_label[label].pop()] for label in sorted(by_label) for _ in range(per_label)]
    pool = [i for indices in by_label.values() for i in indices]
    split = dirichlet_split([records[i]["output"] for i in pool], 3, args.dirichlet, seed)
    sites = []
    for part in split:
        rng.shuffle(part)
        sites.append([records[pool[j]] for j in part[: args.n_train]])
    return {"sites": sites, "test": test}


def embedded(args, seed: int) -> dict:
    sites = [default_site_data(k, n_train=args.n_train, n_eval=1, seed=seed)[0] for k in range(3)]
    test = [r for k in range(3) for r in default_site_data(k, n_train=1, n_eval=args.n_test // 3, seed=0)[1]]
    return {"sites": sites, "test": test}


def site_config(args, seed: int) -> SiteConfig:
    return SiteConfig(rank=8, alpha=16.0, lr=args.lr, local_steps=args.steps, batch_size=args.batch,
                      max_length=args.max_length, eval_batch_size=8, max_new_tokens=args.max_new_tokens,
                      threads=args.threads, seed=seed)


def nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def run_row(row: str, args, model_dir: str, data: dict, seed: int) -> dict:
    criterion, lam_n = ROWS[row]
    model, tokenizer = load_model_and_tokenizer(model_dir)
    cfg = site_config(args, seed)
    if args.layer_mode == "lora":
        model = add_lora(model, cfg)
        reset_lora(model, seed)
    for p in model.parameters():
        p.requires_grad_(False)
    if criterion is None:
        t0 = time.perf_counter()
        out = evaluate(model, tokenizer, data["test"], cfg)
        return {**out, "eval_seconds": time.perf_counter() - t0}
    budgets = [int(b) for b in args.budgets.split(",")]
    n = len(data["sites"])
    # every site drives the same model: between tasks it always holds the global model
    sites = [SelectiveSite(model, tokenizer, data["sites"][k], data["test"][:1], cfg, site=f"site-{k + 1}",
                           site_index=k, mode=args.layer_mode, budget=budgets[k], score_batches=args.score_batches,
                           environ={})
             for k in range(n)]
    k_layers = sites[0].num_layers
    global_state, versions = {}, {}
    history, train_seconds, score_seconds = [], 0.0, 0.0
    for rnd in range(args.rounds):
        scores = None
        if criterion in SCORED:
            t0 = time.perf_counter()
            scores = [s.score("grad_norm" if criterion == "selective" else criterion, rnd)["scores"] for s in sites]
            score_seconds += time.perf_counter() - t0
        mask = choose_layers(criterion, budgets, k_layers, scores=scores, lam=lam_n / n, seed=seed * 1000 + rnd,
                             sites=[s.site for s in sites])
        assigned = [[int(l) for l in torch.nonzero(r).flatten()] for r in mask]
        updates, weights, up_bytes, losses = [], [], [], []
        for s, layers in zip(sites, assigned):
            t0 = time.perf_counter()
            update, stats = s.train(layers, rnd)
            train_seconds += time.perf_counter() - t0
            validate_layer_update(update, layers)
            updates.append(update)
            weights.append(len(s.train_set))
            up_bytes.append(nbytes(update))
            losses.append(stats["train_loss"] if stats else None)
        new = average_layers(updates, weights)
        global_state.update(new)
        for layer in {layer_of(k) for k in new}:
            versions[layer] = versions.get(layer, 0) + 1
        for s in sites:  # every site installs the round's new global layers (shared model: idempotent)
            s.install(new, {"layer_versions": {str(l): versions[l] for l in {layer_of(k) for k in new}}})
        entry = {"round": rnd, "layers": assigned, "upload_bytes": up_bytes, "train_loss": losses,
                 "inconsistency": inconsistency(mask)}
        if scores is not None:
            g = normalize_scores(scores)
            entry["captured"] = [float((g[i] * mask[i].numpy()).sum() / k_layers) for i in range(n)]
        history.append(entry)
        log(f"  {row} round {rnd}: layers {assigned}, train loss {[round(x, 3) for x in losses if x is not None]}")
    t0 = time.perf_counter()
    out = evaluate(model, tokenizer, data["test"], cfg)
    digests = {s.digest() for s in sites}
    assert len(digests) == 1
    return {**out, "eval_seconds": time.perf_counter() - t0, "train_seconds": train_seconds,
            "score_seconds": score_seconds, "rounds": history, "budgets": budgets, "lam": lam_n / n,
            "num_layers": k_layers}


def _mean(xs):
    return sum(xs) / len(xs)


def _fmt(xs, digits=3):
    return f"{xs[0]:.{digits}f}" if len(xs) == 1 else f"{_mean(xs):.{digits}f} ± {(max(xs) - min(xs)) / 2:.{digits}f}"


def markdown(results: dict, rows: list[str]) -> str:
    lines = ["| row | test exact match | per seed | test answer loss | layers trained in the last round, seed "
             "0 (site-1 / site-2 / site-3) | inconsistency | upload / round (all sites) | train s | score s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        runs = [(key.split("/")[1], r) for key, r in sorted(results["runs"].items()) if key.split("/")[0] == row]
        if not runs:
            continue
        criterion, lam_n = ROWS[row]
        name = "zero-shot" if criterion is None else (f"selective λ·N={lam_n:g}" if criterion == "selective" else criterion)
        em = [r["exact_match"] for _, r in runs]
        loss = [r["eval_loss"] for _, r in runs]
        per_seed = ", ".join(f"{x:.3f}" for x in em)
        first = runs[0][1]
        if "rounds" in first:
            last = first["rounds"][-1]
            k = first.get("num_layers")
            layers = " / ".join("all" if k and len(ls) == k else ",".join(map(str, ls)) for ls in last["layers"])
            incons = _fmt([float(r["rounds"][-1]["inconsistency"]) for _, r in runs], 1)
            up = _mean([sum(r["rounds"][-1]["upload_bytes"]) for _, r in runs]) / 2**20
            lines.append(f"| {name} | {_fmt(em)} | {per_seed} | {_fmt(loss)} | {layers} | {incons} | {up:.1f} MiB | "
                         f"{_mean([r['train_seconds'] for _, r in runs]):.0f} | "
                         f"{_mean([r['score_seconds'] for _, r in runs]):.0f} |")
        else:
            lines.append(f"| {name} | {_fmt(em)} | {per_seed} | {_fmt(loss)} | — | — | — | — | — |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=list(PRESETS), default="quick")
    p.add_argument("--layer-mode", choices=["full", "lora"], default="full", help="train full layer weights or LoRA")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=DEFAULT_ROWS)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="data split, init and order seeds")
    p.add_argument("--dirichlet", type=float, default=0.5)
    p.add_argument("--fresh", action="store_true")
    for key, value in PRESETS["full"].items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=None)
    args = p.parse_args(argv)
    for key, value in PRESETS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or Path("/tmp/flare_lora_selective_quality") / args.mode
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.mode == "quick":
        model_dir = str(args.out / "tiny-llama")
        if not (Path(model_dir) / "config.json").is_file():
            make_tiny_llama(model_dir, TOKENIZER_DIR, layers=6)
    else:
        model_dir = resolve_model_dir(None)
    _, tokenizer = load_model_and_tokenizer(model_dir)
    config = {k: getattr(args, k) for k in ["mode", "layer_mode", "dirichlet", *PRESETS["full"]]}
    path = args.out / "results.json"
    results = {"config": config, "runs": {}, "data": {}}
    if path.is_file() and not args.fresh:
        old = json.loads(path.read_text())
        if old.get("config") != config:
            raise SystemExit(f"{path} holds results for other settings; use another --out or --fresh")
        results = old
    for seed in args.seeds:  # seed-major: an interrupted run still compares every row on the first seed
        data = embedded(args, seed) if args.mode == "quick" else ag_news(tokenizer, args, seed)
        results["data"][str(seed)] = {"site_labels": [dict(sorted(Counter(r["output"] for r in s).items()))
                                                      for s in data["sites"]], "n_test": len(data["test"])}
        log(f"model {model_dir}; seed {seed}: site label mixes {results['data'][str(seed)]['site_labels']}; "
            f"test {len(data['test'])}")
        for row in args.rows:
            key = f"{row}/{seed}"
            if key in results["runs"]:
                log(f"skip {key} (done)")
                continue
            t0 = time.perf_counter()
            log(f"run {key}")
            out = run_row(row, args, model_dir, data, seed)
            out["wall_seconds"] = time.perf_counter() - t0
            results["runs"][key] = out
            path.write_text(json.dumps(results, indent=1, default=str))
            (args.out / "results.md").write_text(markdown(results, list(ROWS)))
            log(f"done {key}: exact match {out['exact_match']:.3f}, loss {out['eval_loss']:.4f} "
                f"({out['wall_seconds']:.0f} s; total {time.perf_counter() - start:.0f} s)")
    md = markdown(results, list(ROWS))
    (args.out / "results.md").write_text(md)
    print(md)
    log(f"wrote {path} and {args.out / 'results.md'} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
