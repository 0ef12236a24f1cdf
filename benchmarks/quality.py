"""Quality benchmark: FLoRA stacking vs FedIT vs zero-padding vs centralised LoRA, in-process.

No FLARE: every simulated site is a real model with its own LoRA, driven through the same code a
FLARE job runs (``SiteConfig``, ``add_lora``, ``train_lora``, ``evaluate`` and the method strategy
objects of ``flare_lora.components.strategies``: server ``aggregate``/``payload``, client ``install``). FLoRA
sites really merge every stacked round into their own base weights; the benchmark asserts that the
sites end with identical base weights (``weights_digest``) and that the merged change equals
``FLoRA.final`` (the concatenation of all stacked rounds).

    python benchmarks/quality.py --mode quick                 # tiny random Llama, < 2 min
    python benchmarks/quality.py --mode full --threads 1      # SmolLM2-135M on AG News, ~30 min

Full-mode data: AG News test.csv rows whose prompt + answer fit ``--max-length`` tokens (the
project's ``encode`` would otherwise cut the prompt from the left, dropping the instruction); a
fixed, label-balanced test set of ``--n-test`` rows; the rest is the training pool. Per seed,
``dirichlet_split`` (alpha 0.5) partitions the pool over 3 sites, and each site gets exactly
``--n-train`` records with its share's label mix (drawn without replacement, disjoint across sites;
a raw share can be smaller than n_train). Centralised LoRA trains on the union of the sites' records.

On a CPU shared with other busy processes use ``--threads 1``: with 2 OpenMP threads every op
waits for a descheduled thread (measured 10-17 s per step instead of ~3.5 s). Results do not
depend on the thread count (the training losses agree to the printed digits).

Results go to ``--out`` (default /tmp/flare_lora_quality/<mode>): ``results.json`` (every run,
saved after each one, so an interrupted run resumes where it stopped), ``results.md`` (table)
and ``quality.png`` (plot). Runs already in ``results.json`` are skipped; a changed setting
(other than rows, seeds, threads) refuses to mix with old results: pass another --out or --fresh.

Rows: zero-shot (base model), centralised LoRA (rank 8 on the union of the sites' training data,
as many optimizer steps as all sites together), FLoRA and FedIT with ranks (8, 8, 8), FLoRA and
zero-padding (HetLoRA) with ranks (4, 8, 16). alpha = 2 * rank everywhere, so every site has the
same scaling s = 2 (FedIT requires equal scalings; it also makes zero-padding's fold of s into B a
plain factor 2).

Metrics on the global model (what every site holds after installing the last aggregate):
exact match and answer loss on a shared label-balanced test set; "label accuracy" (the first
label name in the answer, which also credits a zero-shot answer that wraps the label in a
sentence); and a per-site accuracy, the per-label test accuracy weighted by each site's training
label mix (the accuracy expected on that site's own held-out distribution, at no extra cost).
Communication: bytes (numel * element size) of each site's upload and of each site's download
per round, from the tensors the strategies actually produce.

Data order: each site trains round r with the data-order seed ``seed * 1000003 + r * 1009 + k``
(site k), for every method. ``components/flare/client_train.py`` trains with its install seed,
which is the same for FLoRA but, for FedIT and zero-pad (``site_specific_init`` False), omits the
``+ k``: all sites read their (different) data in the same index order. ``--client-order`` uses
the client's seed exactly; the published numbers were made without it.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

import flare_lora.components.training.trainer as trainer_module
from flare_lora.components.algorithms.averaging import zero_pad
from flare_lora.components.algorithms.merge import lora_delta, weights_digest
from flare_lora.components.data.prompts import encode, normalize_answer
from flare_lora.components.data.split import dirichlet_split
from flare_lora.components.data.synthetic import default_site_data
from flare_lora.components.algorithms.shared_a import b_only
from flare_lora.components.strategies import FLoRA, SiteUpdate, check_update, get_method
from flare_lora.components.training.config import SiteConfig
from flare_lora.components.training.lora import add_lora, base_weights, freeze_lora_a, linear_shapes, lora_state
from flare_lora.components.training.models import load_model_and_tokenizer, make_tiny_llama, resolve_model_dir
from flare_lora.components.training.trainer import evaluate, set_threads, train_lora
from flare_lora.privacy.dp_sgd import DPSGD

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FLARE_LORA_SHARED", ROOT.parent / "shared" / "data"))
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")
TOKENIZER_DIR = SHARED / "smollm2-135m-instruct-q4_1"
AG_NEWS_CSV = SHARED / "ag_news_test" / "test.csv"
AG_LABELS = {"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"}
AG_INSTRUCTION = "Classify the topic of this news article as World, Sports, Business or Sci/Tech."

# name -> (kind, method, ranks); kind is "zero_shot", "central" or "fed"
ROWS = {
    "zero_shot": ("zero_shot", None, ()),
    "central": ("central", None, (8,)),
    "flora_hom": ("fed", "flora", (8, 8, 8)),
    "fedit_hom": ("fed", "fedit", (8, 8, 8)),
    "flora_het": ("fed", "flora", (4, 8, 16)),
    "zero_pad_het": ("fed", "zero_pad", (4, 8, 16)),
}
LABELS = {
    "zero_shot": "zero-shot",
    "central": "centralised LoRA r=8",
    "flora_hom": "FLoRA (8,8,8)",
    "fedit_hom": "FedIT (8,8,8)",
    "flora_het": "FLoRA (4,8,16)",
    "zero_pad_het": "zero-pad (4,8,16)",
}

PRESETS = {
    "quick": dict(rounds=2, steps=3, batch=4, max_length=96, lr=1e-3, n_train=32, n_test=24,
                  max_new_tokens=8, eval_batch=8),
    # sized for 2 shared CPU cores (~30 min): 2 seeds x 5 trained rows x 3 sites x 2 rounds x 5 steps
    "full": dict(rounds=2, steps=5, batch=4, max_length=112, lr=5e-4, n_train=96, n_test=60,
                 max_new_tokens=8, eval_batch=8),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def ag_news_records(tokenizer, max_length: int) -> list[dict]:
    """AG News rows as instruction records, only those that fit max_length untruncated.

    (``encode`` would cut a too-long prompt from the LEFT, dropping the instruction.)
    """
    records = []
    with open(AG_NEWS_CSV, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            text = f"{row['title'].strip()}. {row['description'].strip()}".replace("\\", " ")
            record = {"instruction": AG_INSTRUCTION, "input": text, "output": AG_LABELS[row["label"]],
                      "label": AG_LABELS[row["label"]]}
            if len(encode(tokenizer, record, 10_000)["input_ids"]) <= max_length:
                records.append(record)
    return records


def ag_news_test_indices(records: list[dict], n_test: int) -> list[int]:
    """A fixed (seed-independent) label-balanced test set."""
    rng = random.Random("flare-lora-quality-test")
    by_label: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_label.setdefault(r["label"], []).append(i)
    per_label = n_test // len(by_label)
    return sorted(i for label in sorted(by_label) for i in rng.sample(by_label[label], per_label))


def _largest_remainder(counts: Counter, n: int) -> dict[str, int]:
    """Integer counts summing to n in the proportions of ``counts``."""
    total = sum(counts.values())
    raw = {k: v * n / total for k, v in counts.items()}
    out = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (out[k] - raw[k], k))[: n - sum(out.values())]:
        out[k] += 1
    return out


def make_data(mode: str, args, tokenizer, cache: dict, seed: int, n_sites: int = 3) -> dict:
    """{"sites": [train records per site], "test": [...], "site_labels": [Counter per site]}."""
    if mode == "quick":
        sites = [default_site_data(k, n_train=args.n_train, n_eval=1, seed=seed)[0] for k in range(n_sites)]
        per_site_eval = max(1, args.n_test // n_sites)
        test = [r for k in range(n_sites)
                for r in default_site_data(k, n_train=1, n_eval=per_site_eval, seed=0)[1]]
        for r in test:
            r["label"] = r["category"]
        for site in sites:
            for r in site:
                r["label"] = r["category"]
    else:
        if "ag" not in cache:
            records = ag_news_records(tokenizer, args.max_length)
            test_idx = ag_news_test_indices(records, args.n_test)
            taken = set(test_idx)
            cache["ag"] = (records, [records[i] for i in test_idx], [i for i in range(len(records)) if i not in taken])
            log(f"AG News: {len(records)} records fit max_length={args.max_length}; "
                f"test {len(test_idx)} (balanced), training pool {len(cache['ag'][2])}")
        records, test, pool = cache["ag"]
        pool_labels = [records[i]["label"] for i in pool]
        split = dirichlet_split(pool_labels, n_sites, args.dirichlet, seed)
        # Each site keeps its Dirichlet share's label MIX but gets exactly n_train records, drawn
        # without replacement (disjoint across sites) from the pool's per-label lists: a raw share
        # can be smaller than n_train (alpha = 0.5 gave one site 55 of 4905 records).
        rng = random.Random(f"flare-lora-quality-train:{seed}")
        by_label: dict[str, list[int]] = {}
        for j, label in enumerate(pool_labels):
            by_label.setdefault(label, []).append(pool[j])
        for indices in by_label.values():
            rng.shuffle(indices)
        sites = []
        for part in split:
            counts = _largest_remainder(Counter(pool_labels[j] for j in part), args.n_train)
            site = [records[by_label[label].pop()] for label, n in sorted(counts.items()) for _ in range(n)]
            rng.shuffle(site)
            sites.append(site)
    site_labels = [dict(sorted(Counter(r["label"] for r in s).items())) for s in sites]
    return {"sites": sites, "test": test, "site_labels": site_labels}


# ---------------------------------------------------------------------------------------------
# Evaluation (the project's evaluate, with its generated answers captured for label accuracy)
# ---------------------------------------------------------------------------------------------

_captured: list[list[str]] = []
_original_generate = trainer_module.generate_answers


def _capturing_generate(model, tokenizer, records, cfg):
    answers = _original_generate(model, tokenizer, records, cfg)
    _captured.append(list(answers))
    return answers


trainer_module.generate_answers = _capturing_generate  # evaluate() looks generate_answers up at call time


def first_label(prediction: str, labels: list[str]) -> str | None:
    """The label whose name appears first in the (normalised) prediction."""
    text = normalize_answer(prediction)
    hits = [(text.find(normalize_answer(label)), label) for label in labels]
    hits = [(pos, -len(label), label) for pos, label in hits if pos >= 0]
    return min(hits)[2] if hits else None


def eval_global(model, tokenizer, test: list[dict], cfg: SiteConfig, site_labels: list[dict]) -> dict:
    _captured.clear()
    result = evaluate(model, tokenizer, test, cfg)
    predictions = _captured[-1]
    labels = sorted({r["output"] for r in test})
    per_label_hits: dict[str, list[int]] = {}
    label_hits = 0
    for pred, record in zip(predictions, test, strict=True):
        per_label_hits.setdefault(record["label"], []).append(
            int(normalize_answer(pred) == normalize_answer(record["output"])))
        label_hits += first_label(pred, labels) == record["output"]
    per_label = {k: sum(v) / len(v) for k, v in sorted(per_label_hits.items())}
    site_em = []
    for mix in site_labels:
        total = sum(n for label, n in mix.items() if label in per_label)
        site_em.append(sum(per_label[label] * n for label, n in mix.items() if label in per_label) / total)
    return {
        "exact_match": result["exact_match"],
        "label_accuracy": label_hits / len(test),
        "eval_loss": result["eval_loss"],
        "n_test": result["n"],
        "per_label_exact_match": per_label,
        "site_weighted_exact_match": site_em,
        "examples": [{"reference": r["output"], "prediction": p} for r, p in list(zip(test, predictions))[:6]],
    }


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


def nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def site_config(args, rank: int, seed: int, steps: int | None = None) -> SiteConfig:
    return SiteConfig(
        rank=rank, alpha=2.0 * rank, lr=args.lr, local_steps=steps or args.steps, batch_size=args.batch,
        max_length=args.max_length, eval_batch_size=args.eval_batch, max_new_tokens=args.max_new_tokens,
        threads=args.threads, seed=seed,
    )


def run_zero_shot(args, model_dir, data) -> dict:
    model, tokenizer = load_model_and_tokenizer(model_dir)
    cfg = site_config(args, 8, 0)
    t0 = time.perf_counter()
    out = eval_global(model, tokenizer, data["test"], cfg, data["site_labels"])
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def run_central(args, model_dir, data, seed: int) -> dict:
    """One rank-8 LoRA on the union of the sites' data, n_sites * rounds * steps optimizer steps."""
    model, tokenizer = load_model_and_tokenizer(model_dir)
    steps = len(data["sites"]) * args.rounds * args.steps
    cfg = site_config(args, 8, seed, steps=steps)
    union = [r for site in data["sites"] for r in site]
    random.Random(seed).shuffle(union)
    peft_model = add_lora(model, cfg, "central")
    stats = train_lora(peft_model, tokenizer, union, cfg, desc=f"central seed {seed}")
    t0 = time.perf_counter()
    out = eval_global(peft_model, tokenizer, data["test"], cfg, data["site_labels"])
    out.update(eval_seconds=time.perf_counter() - t0, train_seconds=stats["seconds"], steps=steps,
               train_loss=stats["train_loss"])
    return out


class HETransport:
    """The HE path in-process: sites encrypt what they upload as HEEncryptFilter does, the server
    vets and aggregates ciphertexts (privacy/he_server.py), sites decrypt what they are sent."""

    def __init__(self, method, folder: str):
        from flare_lora.privacy.he_context import CLIENT_CONTEXT, SERVER_CONTEXT, Ckks, load_context, provision_sim_contexts
        from flare_lora.privacy.he_server import EncryptedRounds, open_server_context

        provision_sim_contexts(folder)
        self.site = Ckks(*load_context(os.path.join(folder, CLIENT_CONTEXT), "site"))
        self.server = EncryptedRounds(method, open_server_context(os.path.join(folder, SERVER_CONTEXT)))

    def payload(self, rounds, merged: int) -> tuple[dict, int]:
        """(what the site installs, bytes on the wire)."""
        import msgpack

        from flare_lora.privacy.he_aggregate import decrypt_payload
        from flare_lora.privacy.he_packing import HE_KEY

        wire = self.server.payload(rounds, merged)[HE_KEY]
        return decrypt_payload(wire, self.site), len(msgpack.packb(wire, use_bin_type=True))

    def upload(self, state: dict, rank: int, alpha: float, name: str, ranks) -> tuple[object, dict, int]:
        """(the ciphertext update the server aggregates, zero stubs of its shapes, bytes on the wire)."""
        import msgpack

        from flare_lora.privacy.he_packing import HE_KEY, encrypt_state

        plan = self.server.plan(list(ranks))
        wire = encrypt_state(state, self.site, plan["grouping"], plan["pad_rank"], plan["bound"],
                             {"B": alpha / rank} if plan["scale_b"] else None)
        stubs, encrypted = self.server.vet({HE_KEY: wire}, rank, name)
        return encrypted, stubs, len(msgpack.packb(wire, use_bin_type=True))


def relative_change(start: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> float:
    """‖A_end − A_start‖_F / ‖A_start‖_F over a site's lora_A tensors: how far training moved its A."""
    moved = sum(float((state[k].float() - a).pow(2).sum()) for k, a in start.items())
    norm = sum(float(a.pow(2).sum()) for a in start.values())
    return (moved / norm) ** 0.5 if norm > 0 else 0.0


def averaging_error(updates: list[SiteUpdate]) -> float:
    """‖B̄·Ā − Σ p_k s_k B_k A_k‖_F / ‖Σ p_k s_k B_k A_k‖_F over a round's updates (B̄, Ā: zero-padded
    weighted means, FedIT's with equal ranks): what averaging the factors separately loses against
    the exact sum that stacking computes. With equal ranks it grows as the sites' A's move apart;
    with mixed ranks the padding adds its own error."""
    total = sum(u.num_examples for u in updates)
    p = [u.num_examples / total for u in updates]
    averaged = lora_delta(zero_pad([u.state for u in updates], p, [u.scaling for u in updates]))
    deltas = [lora_delta(u.state, u.scaling) for u in updates]
    err = norm = 0.0
    for name, approx in averaged.items():
        exact = sum(pk * d[name] for pk, d in zip(p, deltas) if name in d)
        err += float((approx - exact).pow(2).sum())
        norm += float(exact.pow(2).sum())
    return (err / norm) ** 0.5 if norm > 0 else 0.0


def run_federated(args, model_dir, data, seed: int, method_name: str, ranks: tuple[int, ...],
                  base_digest: str, dp: dict | None = None, *, options: dict | None = None, he: bool = False,
                  scorer=None, device: str = "cpu") -> dict:
    """T rounds of install -> local train -> upload -> aggregate, then every site installs the last
    aggregate; the global model is evaluated on the largest-rank site (for zero-pad and hlora the
    only one that holds the full-rank global; for the FLoRA family and FedIT every site holds the
    same model). ``dp``: SiteConfig ``dp_*`` keys every site trains with (benchmarks/dp_utility.py);
    ``options``: the method's options (a bounded FLoRA global, hlora's rank); ``he``: aggregate
    ciphertexts (HETransport); ``scorer``: the evaluation (default ``eval_global``)."""
    method = get_method(method_name, **(options or {}))
    sites = []
    for k, rank in enumerate(ranks):
        model, tokenizer = load_model_and_tokenizer(model_dir)
        cfg = dataclasses.replace(site_config(args, rank, seed), **(dp or {}))
        private = DPSGD(cfg, len(data["sites"][k]), site=f"site-{k + 1}", noise_seed=seed) if dp else None
        peft_model = add_lora(model, cfg, f"site-{k + 1}")
        if method.shared_a:
            freeze_lora_a(peft_model)
        sites.append({"name": f"site-{k + 1}", "cfg": cfg, "model": peft_model.to(device),
                      "train": data["sites"][k], "merged": 0, "dp": private})
    if method.shared_a:  # the server draws A from the job's module shapes, as LoraController binds them
        prefixes = {key.rsplit(".lora_", 1)[0] for key in lora_state(sites[0]["model"])}
        method.bind(f"quality-{seed}", linear_shapes(sites[0]["model"], prefixes))
    transport = HETransport(method, tempfile.mkdtemp(prefix="quality-he-")) if he else None
    adapted = None  # initial copies of the adapted base weights, for the final() check
    rounds: list = []
    history, bounded = [], []
    train_seconds = 0.0
    for rnd in range(args.rounds + 1):  # the extra pass installs the last aggregate, no training
        record = {"round": rnd, "download_bytes": [], "upload_bytes": [], "train_loss": [], "a_drift": []}
        updates = []
        for k, site in enumerate(sites):
            if transport:
                params, sent = transport.payload(rounds, site["merged"])
            else:
                params = method.payload(rounds, site["merged"])
                sent = nbytes(params)
            record["download_bytes"].append(sent)
            seed_r = seed * 1000003 + rnd * 1009 + (k if method.site_specific_init else 0)
            seed_r = method.round_seed(rnd) if method.shared_a else seed_r
            site["merged"] = method.install(site["model"], params, site["merged"], seed=seed_r)
            if rnd == args.rounds:
                continue
            order_seed = seed_r if args.client_order else seed * 1000003 + rnd * 1009 + k
            cfg = dataclasses.replace(site["cfg"], seed=order_seed)
            start_a = {key: t.detach().float().clone() for key, t in lora_state(site["model"]).items() if ".lora_A" in key}
            stats = train_lora(site["model"], tokenizer, site["train"], cfg,
                               desc=f"{method_name} {site['name']} r={cfg.rank} round {rnd}", dp=site["dp"])
            train_seconds += stats["seconds"]
            state = lora_state(site["model"])
            record["a_drift"].append(relative_change(start_a, state))
            state = b_only(state) if method.shared_a else state
            if transport:
                encrypted, checked, up = transport.upload(state, cfg.rank, cfg.alpha, site["name"], ranks)
            else:
                encrypted, checked, up = None, state, nbytes(state)
            checked = method.expand(checked, rnd, cfg.rank) if method.shared_a else checked
            update = SiteUpdate(site["name"], checked, len(site["train"]), cfg.rank, cfg.alpha)
            check_update(update)
            if transport:  # the server aggregates the ciphertexts; the plaintext stubs were checked
                update.state = encrypted
            updates.append(update)
            record["upload_bytes"].append(up)
            record["train_loss"].append(stats["train_loss"])
        if updates and not (transport or method.shared_a or method.site_specific_init):
            record["averaging_error"] = averaging_error(updates)
        if updates:
            if adapted is None and isinstance(method, FLoRA) and not transport:
                names = lora_delta(updates[0].state).keys()
                weights = base_weights(sites[0]["model"])
                adapted = {n: weights[n].detach().clone() for n in names}
            rounds.append(transport.server.aggregate(updates) if transport else method.aggregate(updates))
            report = method.commit(rounds)
            if report:
                bounded.append(report)
        history.append(record)
        log(f"  round {rnd}: down {record['download_bytes']} B, up {record['upload_bytes']} B, "
            f"train loss {[round(x, 4) for x in record['train_loss']]}")

    digests = [weights_digest(base_weights(site["model"])) for site in sites]
    if len(set(digests)) != 1:
        raise AssertionError(f"sites hold different base weights: {digests}")
    if isinstance(method, FLoRA):
        assert digests[0] != base_digest, f"{method_name} merged nothing into the base weights"
        if not transport:  # the sites' change is the model the server exports
            final_state, scaling = method.final(rounds)
            weights = base_weights(sites[0]["model"])
            for name, delta in lora_delta(final_state, scaling).items():
                torch.testing.assert_close(weights[name].cpu() - adapted[name].cpu(), delta, rtol=1e-4, atol=1e-5)
    else:
        assert digests[0] == base_digest, f"{method_name} changed the base weights"
    best = max(range(len(sites)), key=lambda k: ranks[k])
    t0 = time.perf_counter()
    out = (scorer or eval_global)(sites[best]["model"], tokenizer, data["test"], sites[best]["cfg"], data["site_labels"])
    out.update(eval_seconds=time.perf_counter() - t0, train_seconds=train_seconds, rounds=history,
               base_digest=digests[0], steps=len(sites) * args.rounds * args.steps)
    if bounded:
        out["bounded"] = bounded
    if dp:
        out["dp"] = [site["dp"].report() for site in sites]
    return out


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def _mean(xs):
    return sum(xs) / len(xs)


def summarize(results: dict, rows: list[str]) -> list[dict]:
    table = []
    for row in rows:
        runs = [(key.split("/", 1)[1], run) for key, run in sorted(results["runs"].items())
                if key.split("/", 1)[0] == row]
        if not runs:
            continue
        em = [r["exact_match"] for _, r in runs]
        acc = [r["label_accuracy"] for _, r in runs]
        loss = [r["eval_loss"] for _, r in runs]
        site = [_mean(r["site_weighted_exact_match"]) for _, r in runs]
        entry = {
            "row": row, "label": LABELS[row], "seeds": [s for s, _ in runs],
            "exact_match": em, "label_accuracy": acc, "eval_loss": loss, "site_exact_match": site,
            "train_seconds": [r.get("train_seconds", 0.0) for _, r in runs],
        }
        fed_rounds = runs[0][1].get("rounds")
        if fed_rounds:
            # steady state: a round after the first (round 0 downloads nothing)
            later = fed_rounds[1] if len(fed_rounds) > 1 else fed_rounds[0]
            entry["upload_per_round"] = sum(fed_rounds[0]["upload_bytes"])
            entry["download_per_round"] = sum(later["download_bytes"])
        table.append(entry)
    return table


def _fmt(xs, digits=3):
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{_mean(xs):.{digits}f} ± {(max(xs) - min(xs)) / 2:.{digits}f}"


def _kib(n):
    return "—" if n is None else (f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB")


def markdown(table: list[dict]) -> str:
    lines = [
        "| row | test exact match | per seed | label accuracy | test answer loss | site-weighted EM | "
        "upload / round (all sites) | download / round (all sites) | train s / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in table:
        per_seed = ", ".join(f"{x:.3f}" for x in e["exact_match"])
        lines.append(
            f"| {e['label']} | {_fmt(e['exact_match'])} | {per_seed} | {_fmt(e['label_accuracy'])} | "
            f"{_fmt(e['eval_loss'])} | {_fmt(e['site_exact_match'])} | {_kib(e.get('upload_per_round'))} | "
            f"{_kib(e.get('download_per_round'))} | {_mean(e['train_seconds']):.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [e["label"] for e in table]
    colors = ["#999999", "#555555", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    for ax, key, ylabel in ((axes[0], "exact_match", "test exact match"),
                            (axes[1], "eval_loss", "test answer loss (nats/token)")):
        for i, e in enumerate(table):
            ax.bar(i, _mean(e[key]), color=colors[list(ROWS).index(e["row"]) % len(colors)], alpha=0.8)
            ax.scatter([i] * len(e[key]), e[key], color="black", s=12, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(0, 1)
    fig.suptitle(title + "  (bars: mean over seeds, dots: seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".results-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def write_reports(results: dict, out: Path, rows: list[str]) -> str:
    table = summarize(results, rows)
    md = markdown(table)
    (out / "results.md").write_text(md)
    c = results["config"]
    title = (f"{c['mode']}: {c['model']} | T={c['rounds']} rounds x {c['steps']} steps, batch {c['batch']}, "
             f"lr {c['lr']}, n_train {c['n_train']}/site, test {c['n_test']}")
    plot(table, out / "quality.png", title)
    return md


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=list(PRESETS), default="quick")
    p.add_argument("--out", type=Path, default=None, help="default /tmp/flare_lora_quality/<mode>")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    for key in PRESETS["full"]:
        p.add_argument("--" + key.replace("_", "-"), type=type(PRESETS["full"][key]), default=None)
    p.add_argument("--dirichlet", type=float, default=0.5, help="label-skew alpha (full mode)")
    p.add_argument("--client-order", action="store_true",
                   help="train with the data-order seed components/flare/client_train.py uses (its install seed)")
    p.add_argument("--fresh", action="store_true", help="discard existing results in --out")
    p.add_argument("--report-only", action="store_true", help="rewrite results.md and quality.png from results.json")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or Path("/tmp/flare_lora_quality") / args.mode
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    if args.mode == "quick":
        model_dir = str(args.out / "tiny-llama")
        if not (Path(model_dir) / "config.json").is_file():
            make_tiny_llama(model_dir, TOKENIZER_DIR)
        model_name = "tiny random Llama (hidden 64, 2 layers)"
        task = "embedded default tasks (flare_lora.components.data.synthetic)"
    else:
        model_dir = resolve_model_dir(None)
        model_name = "SmolLM2-135M-Instruct (fp32, dequantized Q4_1 GGUF)"
        task = f"AG News topic classification, Dirichlet({args.dirichlet}) label skew over 3 sites"

    config = {
        "mode": args.mode, "model": model_name, "task": task, "rounds": args.rounds, "steps": args.steps,
        "batch": args.batch, "max_length": args.max_length, "lr": args.lr, "n_train": args.n_train,
        "n_test": args.n_test, "max_new_tokens": args.max_new_tokens, "dirichlet": args.dirichlet,
        "client_order": args.client_order, "target_modules": SiteConfig().target_modules,
        "alpha": "2 * rank", "sites": 3,
    }
    path = args.out / "results.json"
    results = {"config": config, "runs": {}, "data": {}}
    if path.is_file() and not args.fresh:
        old = json.loads(path.read_text())
        if old.get("config") != config:
            diff = {k: (old.get("config", {}).get(k), v) for k, v in config.items()
                    if old.get("config", {}).get(k) != v}
            raise SystemExit(f"{path} holds results for other settings {diff}; use another --out or --fresh")
        results = old
        log(f"resuming: {len(results['runs'])} run(s) already in {path}")
    if args.report_only:
        print(write_reports(results, args.out, list(ROWS)))
        return 0

    _, tokenizer = load_model_and_tokenizer(model_dir)
    base_model, _ = load_model_and_tokenizer(model_dir)
    base_digest = weights_digest(base_weights(base_model))
    del base_model
    cache: dict = {}
    data_by_seed = {}

    # seed-major order: a partial run still compares every trained row on the first seed;
    # zero-shot (seed-independent, and the slowest eval: it never stops before max_new_tokens) last
    jobs = [(row, seed) for seed in args.seeds for row in args.rows if row != "zero_shot"]
    jobs += [("zero_shot", None)] if "zero_shot" in args.rows else []
    for row, seed in jobs:
        key = f"{row}/{'all' if seed is None else seed}"
        if key in results["runs"]:
            log(f"skip {key} (done)")
            continue
        data_seed = args.seeds[0] if seed is None else seed
        if data_seed not in data_by_seed:
            data_by_seed[data_seed] = make_data(args.mode, args, tokenizer, cache, data_seed)
            d = data_by_seed[data_seed]
            results["data"][str(data_seed)] = {"site_labels": d["site_labels"], "n_test": len(d["test"]),
                                               "test_labels": dict(Counter(r["label"] for r in d["test"]))}
            log(f"seed {data_seed}: site label counts {d['site_labels']}")
        data = data_by_seed[data_seed]
        kind, method_name, ranks = ROWS[row]
        log(f"run {key}")
        t0 = time.perf_counter()
        if kind == "zero_shot":
            out = run_zero_shot(args, model_dir, data)
        elif kind == "central":
            out = run_central(args, model_dir, data, seed)
        else:
            out = run_federated(args, model_dir, data, seed, method_name, ranks, base_digest)
        out["wall_seconds"] = time.perf_counter() - t0
        results["runs"][key] = out
        save_json(path, results)
        write_reports(results, args.out, list(ROWS))
        log(f"done {key}: exact match {out['exact_match']:.3f}, label acc {out['label_accuracy']:.3f}, "
            f"loss {out['eval_loss']:.4f} ({out['wall_seconds']:.0f} s; total {time.perf_counter() - start:.0f} s)")

    md = write_reports(results, args.out, list(ROWS))
    print(md)
    log(f"wrote {path}, {args.out / 'results.md'}, {args.out / 'quality.png'} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
