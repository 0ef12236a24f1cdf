"""FedCDD ablation: FedIT, FLoRA, consensus-only, divergence-only, FedCDD aggregation, mask-only
(FedIT + noise mask) and full FedCDD (aggregation + mask), on a label-skewed 3-site split.

In-process, through the project's own code paths (no FLARE): every simulated site is a real
model with its own LoRA driven by ``SiteConfig``, ``add_lora``, ``train_lora`` and the strategy
objects of ``flare_lora.components.strategies`` (server ``aggregate``/``payload``, client ``install``); the
mask is the same ``mask_update`` call, with the same per-(site, round) seed, as the site-side
FLARE filter ``components/flare/noise_mask.py``. Data preparation and the evaluation of the
global model are reused from ``benchmarks/quality.py`` (``make_data``, ``eval_global``).

    python benchmarks/fedcdd_ablation.py --mode quick     # tiny random Llama, embedded tasks, < 2 min
    python benchmarks/fedcdd_ablation.py --mode full      # SmolLM2-135M-Instruct on AG News, ~25 min

Every metric is reported on its own scale and never combined: test answer loss (nats/token,
lower is better), exact match and label accuracy (fraction of the shared test set, higher is
better), upload bytes per round (all sites), plus two diagnostics that explain the numbers: how
far FedCDD's divergence weights move from uniform, and how much the consensus magnitude grows
the global factors relative to FedIT's average.

Results: ``--out`` (default /tmp/flare_lora_fedcdd/<mode>): results.json (saved after every run;
rerunning resumes), results.md (the table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402  (data, evaluation and helpers shared with the quality benchmark)

from flare_lora.components.algorithms.averaging import fedit  # noqa: E402
from flare_lora.components.algorithms.consensus_divergence import (  # noqa: E402
    decompose,
    direction_similarity,
    direction_weights,
    fedcdd_aggregate,
)
from flare_lora.components.algorithms.noise_mask import mask_seed, mask_update  # noqa: E402
from flare_lora.components.strategies import SiteUpdate, check_update, get_method  # noqa: E402
from flare_lora.components.training.lora import add_lora, load_lora_state, lora_state  # noqa: E402
from flare_lora.components.training.models import load_model_and_tokenizer, make_tiny_llama, resolve_model_dir  # noqa: E402
from flare_lora.components.training.trainer import set_threads, train_lora  # noqa: E402

# name -> (method, method options, mask on?)
ROWS = {
    "fedit": ("fedit", {}, False),
    "flora": ("flora", {}, False),
    "consensus": ("fedcdd", {"variant": "consensus"}, False),
    "divergence": ("fedcdd", {"variant": "divergence"}, False),
    "fedcdd_agg": ("fedcdd", {}, False),
    "mask_only": ("fedit", {}, True),
    "fedcdd_full": ("fedcdd", {}, True),
}
LABELS = {
    "fedit": "FedIT",
    "flora": "FLoRA (exact stacking)",
    "consensus": "consensus only",
    "divergence": "divergence only",
    "fedcdd_agg": "FedCDD aggregation, no mask",
    "mask_only": "mask only (FedIT + mask)",
    "fedcdd_full": "full FedCDD (aggregation + mask)",
}
PRESETS = {
    "quick": dict(q.PRESETS["quick"]),
    # sized for 2 shared CPU cores (a training step of 2 x ~64 tokens takes 7-12 s there, one
    # evaluation ~90 s) so the 6 default rows x 1 seed fit in <= 25 min: 3 sites x 2 rounds x 3
    # steps, headline-only prompts, 32 test records (8 per label)
    "full": dict(rounds=2, steps=3, batch=2, max_length=80, lr=2e-3, n_train=32, n_test=32,
                 max_new_tokens=4, eval_batch=16),
}
RANK = 8
# Round 0 of every FedIT-style row (all but FLoRA) starts from the same seed-shared adapter and
# trains on the same data with the same seed, so its local training is identical across rows
# (bit for bit on CPU): it runs once per seed and site and is reused (--no-share-round0: rerun).
ROUND0: dict = {}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ag_news_headlines(tokenizer, max_length: int) -> list[dict]:
    """AG News as instruction records with the headline only (half the tokens of headline +
    description: the full mode must fit 25 min on 2 shared cores), those that fit max_length."""
    import csv

    from flare_lora.components.data.prompts import encode

    records = []
    with open(q.AG_NEWS_CSV, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            label = q.AG_LABELS[row["label"]]
            record = {"instruction": q.AG_INSTRUCTION, "input": row["title"].strip().replace("\\", " "),
                      "output": label, "label": label}
            if len(encode(tokenizer, record, 10_000)["input_ids"]) <= max_length:
                records.append(record)
    return records


def make_data(mode: str, args, tokenizer, cache: dict, seed: int) -> dict:
    """quick: quality.make_data (embedded tasks); full: the same Dirichlet label-skew split and
    balanced test set as quality.make_data, on headline-only records."""
    if mode == "quick":
        return q.make_data(mode, args, tokenizer, cache, seed)
    from collections import Counter

    if "ag" not in cache:
        records = ag_news_headlines(tokenizer, args.max_length)
        test_idx = q.ag_news_test_indices(records, args.n_test)
        taken = set(test_idx)
        cache["ag"] = (records, [records[i] for i in test_idx], [i for i in range(len(records)) if i not in taken])
    records, test, pool = cache["ag"]
    pool_labels = [records[i]["label"] for i in pool]
    split = q.dirichlet_split(pool_labels, 3, args.dirichlet, seed)
    rng = q.random.Random(f"flare-lora-fedcdd-train:{seed}")
    by_label: dict[str, list[int]] = {}
    for j, label in enumerate(pool_labels):
        by_label.setdefault(label, []).append(pool[j])
    for indices in by_label.values():
        rng.shuffle(indices)
    sites = []
    for part in split:  # the share's label mix, exactly n_train records, disjoint across sites
        counts = q._largest_remainder(Counter(pool_labels[j] for j in part), args.n_train)
        site = [records[by_label[label].pop()] for label, n in sorted(counts.items()) for _ in range(n)]
        rng.shuffle(site)
        sites.append(site)
    site_labels = [dict(sorted(Counter(r["label"] for r in s).items())) for s in sites]
    return {"sites": sites, "test": test, "site_labels": site_labels}


def weight_spread(states: list[dict], temperature: float) -> float:
    """max |w_k - 1/K| over every matrix of the round: how far divergence weights move from uniform."""
    spread = 0.0
    k = len(states)
    for key in states[0]:
        dirs = [decompose(s[key])[1] for s in states]
        w = direction_weights(direction_similarity(dirs), [1 / k] * k, temperature)
        spread = max(spread, float((w - 1 / k).abs().max()))
    return spread


def norm_gain(states: list[dict], weights: list[int]) -> dict:
    """‖FedCDD global‖ / ‖FedIT global‖ (Frobenius, summed over modules) for A and for B."""
    cdd = fedcdd_aggregate(states, weights)
    avg = fedit(states, weights)
    out = {}
    for part in ("lora_A", "lora_B"):
        keys = [key for key in avg if part in key]
        num = sum(float(cdd[key].norm() ** 2) for key in keys) ** 0.5
        den = sum(float(avg[key].norm() ** 2) for key in keys) ** 0.5
        out[part] = num / den if den else float("nan")
    return out


def run_row(args, model_dir, data, seed: int, row: str) -> dict:
    name, options, masked = ROWS[row]
    method = get_method(name, **({**options, "shrink": args.shrink} if name == "fedcdd" else options))
    sites = []
    for k in range(3):
        model, tokenizer = load_model_and_tokenizer(model_dir)
        cfg = q.site_config(args, RANK, seed)
        sites.append({"name": f"site-{k + 1}", "cfg": cfg, "model": add_lora(model, cfg, f"site-{k + 1}"),
                      "train": data["sites"][k], "merged": 0})
    rounds: list[dict] = []
    history = []
    train_seconds = 0.0
    for rnd in range(args.rounds + 1):  # the extra pass installs the last aggregate, no training
        record = {"round": rnd, "upload_bytes": [], "download_bytes": [], "train_loss": []}
        updates = []
        for k, site in enumerate(sites):
            params = method.payload(rounds, site["merged"])
            record["download_bytes"].append(q.nbytes(params))
            seed_r = seed * 1000003 + rnd * 1009 + (k if method.site_specific_init else 0)
            site["merged"] = method.install(site["model"], params, site["merged"], seed=seed_r)
            if rnd == args.rounds:
                continue
            cfg = dataclasses.replace(site["cfg"], seed=seed * 1000003 + rnd * 1009 + k)
            shared = rnd == 0 and not method.site_specific_init and args.share_round0
            if shared and (seed, k) in ROUND0:  # same init, data and seed: the same local training
                cached_state, stats = ROUND0[(seed, k)]
                load_lora_state(site["model"], cached_state)
            else:
                stats = train_lora(site["model"], tokenizer, site["train"], cfg,
                                   desc=f"{row} {site['name']} round {rnd}")
                train_seconds += stats["seconds"]
                if shared:
                    ROUND0[(seed, k)] = (lora_state(site["model"]), stats)
            state = lora_state(site["model"])
            if masked:  # what the site-side FLARE filter does before upload
                g = torch.Generator().manual_seed(mask_seed(seed, site["name"], rnd))
                state = mask_update(state, args.mask_rho, args.mask_sigma, g)
            update = SiteUpdate(site["name"], state, len(site["train"]), RANK, 2.0 * RANK)
            check_update(update)
            updates.append(update)
            record["upload_bytes"].append(q.nbytes(state))
            record["train_loss"].append(stats["train_loss"])
        if updates:
            states = [u.state for u in updates]
            record["divergence_weight_spread"] = weight_spread(states, 0.1)
            record["consensus_norm_gain"] = norm_gain(states, [u.num_examples for u in updates])
            rounds.append(method.aggregate(updates))
        history.append(record)
        if updates:
            log(f"  {row} round {rnd}: train loss {[round(x, 4) for x in record['train_loss']]}, "
                f"weight spread {record['divergence_weight_spread']:.4f}, norm gain "
                f"{ {k: round(v, 4) for k, v in record['consensus_norm_gain'].items()} }")
    t0 = time.perf_counter()
    out = q.eval_global(sites[0]["model"], tokenizer, data["test"], sites[0]["cfg"], data["site_labels"])
    out.update(eval_seconds=time.perf_counter() - t0, train_seconds=train_seconds, rounds=history)
    return out


def markdown(results: dict, rows: list[str]) -> str:
    lines = [
        "| row | test answer loss ↓ | exact match ↑ | label accuracy ↑ | site-weighted EM ↑ | "
        "upload / round, all sites | divergence weight spread (max \\|w−1/K\\|) | ‖FedCDD‖/‖FedIT‖ A, B |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        runs = [r for key, r in sorted(results["runs"].items()) if key.split("/")[0] == row]
        if not runs:
            continue

        def fmt(values, digits=3):
            mean = sum(values) / len(values)
            half_range = f" ± {(max(values) - min(values)) / 2:.{digits}f}" if len(values) > 1 else ""
            return f"{mean:.{digits}f}" + half_range

        first = runs[0]["rounds"]
        spread = max(r["divergence_weight_spread"] for run in runs for r in run["rounds"]
                     if "divergence_weight_spread" in r)
        gains = {part: max(r["consensus_norm_gain"][part] for run in runs for r in run["rounds"]
                           if "consensus_norm_gain" in r) for part in ("lora_A", "lora_B")}
        # FLoRA uploads fresh site-specific LoRAs: the FedCDD diagnostics do not describe it
        diagnostics = "– | –" if ROWS[row][0] == "flora" else (
            f"{spread:.3f} | {gains['lora_A']:.3f}, {gains['lora_B']:.3f}")
        lines.append(
            f"| {LABELS[row]} | {fmt([r['eval_loss'] for r in runs], 4)} | {fmt([r['exact_match'] for r in runs])} | "
            f"{fmt([r['label_accuracy'] for r in runs])} | "
            f"{fmt([sum(r['site_weighted_exact_match']) / len(r['site_weighted_exact_match']) for r in runs])} | "
            f"{q._kib(sum(first[0]['upload_bytes']))} | {diagnostics} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=list(PRESETS), default="quick")
    p.add_argument("--out", type=Path, default=None, help="default /tmp/flare_lora_fedcdd/<mode>")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=None,
                   help="default: all in quick mode; all but fedcdd_agg in full mode (time budget)")
    for key, value in PRESETS["full"].items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=None)
    p.add_argument("--dirichlet", type=float, default=0.5, help="label-skew alpha (full mode)")
    p.add_argument("--shrink", choices=["cancellation", "agreement", "none"], default="cancellation",
                   help="FedCDD's consensus guard (docs/fedcdd.md step 6); the documented tables used none; "
                        "use a fresh --out when changing it")
    p.add_argument("--mask-rho", type=float, default=0.5)
    p.add_argument("--mask-sigma", type=float, default=1e-3)
    p.add_argument("--no-share-round0", dest="share_round0", action="store_false",
                   help="retrain round 0 for every row instead of reusing the identical first round")
    p.add_argument("--fresh", action="store_true", help="discard existing results in --out")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or Path("/tmp/flare_lora_fedcdd") / args.mode
    if args.rows is None:
        args.rows = list(ROWS) if args.mode == "quick" else [r for r in ROWS if r != "fedcdd_agg"]
    args.client_order = False
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.mode == "quick":
        model_dir = str(args.out / "tiny-llama")
        if not (Path(model_dir) / "config.json").is_file():
            make_tiny_llama(model_dir, q.TOKENIZER_DIR)
        model_name, task = "tiny random Llama (hidden 64, 2 layers)", "embedded default tasks"
    else:
        model_dir = resolve_model_dir(None)
        model_name = "SmolLM2-135M-Instruct"
        task = f"AG News topics, Dirichlet({args.dirichlet}) label skew over 3 sites"
    config = {k: getattr(args, k) for k in PRESETS["full"]}
    config.update(mode=args.mode, model=model_name, task=task, dirichlet=args.dirichlet, rank=RANK, alpha=2 * RANK,
                  mask_rho=args.mask_rho, mask_sigma=args.mask_sigma, target_modules=q.SiteConfig().target_modules)
    path = args.out / "results.json"
    results = {"config": config, "runs": {}}
    if path.is_file() and not args.fresh:
        old = json.loads(path.read_text())
        if old.get("config") != config:
            raise SystemExit(f"{path} holds results for other settings; use another --out or --fresh")
        results = old
    _, tokenizer = load_model_and_tokenizer(model_dir)
    cache: dict = {}
    for seed in args.seeds:
        data = make_data(args.mode, args, tokenizer, cache, seed)
        results.setdefault("data", {})[str(seed)] = {"site_labels": data["site_labels"], "n_test": len(data["test"])}
        log(f"seed {seed}: site label counts {data['site_labels']}, test {len(data['test'])}")
        for row in args.rows:
            key = f"{row}/{seed}"
            if key in results["runs"]:
                log(f"skip {key} (done)")
                continue
            t0 = time.perf_counter()
            out = run_row(args, model_dir, data, seed, row)
            out["wall_seconds"] = time.perf_counter() - t0
            results["runs"][key] = out
            q.save_json(path, results)
            log(f"done {key}: loss {out['eval_loss']:.4f}, exact match {out['exact_match']:.3f}, "
                f"label acc {out['label_accuracy']:.3f} ({out['wall_seconds']:.0f} s, "
                f"total {time.perf_counter() - start:.0f} s)")
    results["wall_seconds_last_invocation"] = time.perf_counter() - start
    q.save_json(path, results)
    md = markdown(results, list(ROWS))
    (args.out / "results.md").write_text(md)
    print(md)
    log(f"wrote {path} and {args.out / 'results.md'} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
