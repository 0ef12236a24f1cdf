"""Server workflow for selective-layer federated fine-tuning.

Each round: (every ``sel_gap`` rounds, or when a sampled site has no selection yet) a "score" task
collects K layer scores and a layer budget from every sampled site; the server picks each site's
layers (``flare_lora.components.algorithms.layer_selection.choose_layers``: the consistency-
regularised solver or a baseline); a "train" task carries each site's layer list; the server vets
every update (a layer it was not assigned, a missing layer, NaN/Inf, a changed shape: rejected and
logged, the round goes on) and averages each layer over the sites that trained it. Layers nobody
trained keep their global value.

Every task ships a site only the global layers that changed since the version it last reported,
so a site's model is always the global model. A final "validate" task evaluates it everywhere and
collects a digest of each site's weights (all equal when the job is consistent).

Results in the run dir (``flare_lora/``): metrics.json (rounds, selections with scores, budgets,
layers, objective and captured gradient mass; rejected updates with the reason) and the final
global layers — a PEFT adapter (lora mode) or ``layers.safetensors`` (full mode).
"""

from __future__ import annotations

import time

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from flare_lora.components.algorithms.layer_average import layer_of, relative_key, validate_layer_update
from flare_lora.components.algorithms.layer_selection import (
    CRITERIA,
    SelectionError,
    check_budgets,
    check_costs,
    check_scores,
    choose_layers,
    normalize_scores,
)
from flare_lora.components.algorithms.layer_solver import EXACT_WORK_LIMIT, exact_work, inconsistency, objective
from flare_lora.components.algorithms.lora_state import InvalidUpdate
from flare_lora.components.flare.workflow import FederatedWorkflow, JobFailed, keep_args
from flare_lora.components.strategies import check_examples
from flare_lora.components.strategies.aggregators import PlainLayers
from flare_lora.privacy.he_server import EncryptedLayers

SCORE_CRITERION = {"selective": "grad_norm", "rgn": "rgn", "snr": "snr"}  # others log grad norms
RESULT_META = ("num_examples", "layers", "train", "digest", "budget", "budget_configured", "budget_cap",
               "criterion", "score_seconds")


class SelectiveController(FederatedWorkflow):
    def __init__(
        self,
        num_rounds: int = 3,
        selection: str = "selective",
        mode: str = "lora",
        lam: float = 0.0,
        sel_gap: int = 1,
        site_budgets: dict | None = None,
        num_layers: int | None = None,
        costs: list | None = None,
        scaling: float = 1.0,
        *args,
        **kwargs,
    ):
        """Args:
        selection: "selective" (the solver with λ = lam) or a baseline: full, top, bottom,
            random, rgn, snr.
        mode: "lora" (sites train the LoRA factors of their layers; FedIT-style per-layer
            averaging) or "full" (the layers' full weights; weighted average per layer).
        lam: the consistency weight λ >= 0 (units: see layer_selection).
        sel_gap: re-select every sel_gap rounds (sites keep their layers in between).
        site_budgets: {site: budget} as configured by the job; a site's admin may lower it
            (the site reports the budget it accepts); a higher report is clamped to this.
        num_layers: K, when the job knows it (else the sites' reports decide).
        costs: K integer layer costs (budgets in the same units); default 1 per layer.
        scaling: alpha / rank of the sites' adapters (lora mode), for the exported adapter.
        args, kwargs: those of FederatedWorkflow (min_clients, he, checkpoint_dir, ...); named so,
            FLARE's job export reads them too.
        """
        super().__init__(*args, **kwargs)
        if selection not in CRITERIA:
            raise ValueError(f"selection: expected one of {list(CRITERIA)}, got {selection!r}")
        if mode not in ("lora", "full"):
            raise ValueError(f"mode: expected 'lora' or 'full', got {mode!r}")
        keep_args(self, locals())
        self.site_budgets = site_budgets or {}

    def new_log(self) -> dict:
        return {"method": "selective", "selection": self.selection, "mode": self.mode, "lam": self.lam,
                "sel_gap": self.sel_gap, "num_rounds": self.num_rounds, "num_layers": self.num_layers,
                "selections": []}

    def make_aggregator(self, ckks):
        return EncryptedLayers(ckks) if ckks else PlainLayers()

    def identity(self) -> dict:
        return {"method": "selective", "selection": self.selection, "mode": self.mode, "lam": self.lam,
                "sel_gap": self.sel_gap, "site_budgets": self.site_budgets, "num_layers": self.num_layers,
                "costs": self.costs, "scaling": self.scaling, "base_model": self.base_model}

    # --- the workflow --------------------------------------------------------------------

    def workflow(self) -> None:
        self.versions: dict[int, int] = {}  # layer -> times aggregated
        self.site_versions: dict[str, dict[int, int]] = {}
        self.site_scores: dict[str, tuple[list[float], int]] = {}  # latest (scores, budget)
        self.assigned: dict[str, list[int]] = {}
        self.known_shapes: dict = {}
        self.layer_keys: set[str] | None = None
        self.K = self.num_layers
        checkpoint, saved = self.open_checkpoint()
        done = len(saved.rounds) if saved else 0
        if saved:
            self.aggregator.state.update(saved.rounds[-1] if saved.rounds else {})
            self.versions = {int(k): v for k, v in saved.extra["versions"].items()}
            self.assigned = {s: list(layers) for s, layers in saved.extra["assigned"].items()}
            self.K = self.log["num_layers"] = saved.extra["num_layers"]
            self.log["selections"] = saved.extra["selections"]
            self.known_shapes = {k: tuple(v.shape) for k, v in self.aggregator.state.items()}
        for rnd in range(done, self.num_rounds):
            self.train_round(rnd)
            self.write_results()
            # round files already written are not rewritten: the checkpoint reads only this round's state
            self.save_checkpoint(checkpoint, [None] * rnd + [getattr(self.aggregator, "state", {})],
                                 {"versions": self.versions, "num_layers": self.K, "assigned": self.assigned,
                                  "selections": self.log["selections"]})
        results, record = self.run_task("validate", self.live_clients(self.num_rounds), self.num_rounds)
        self.log["final"] = record
        digests = {s: d for s, r in results.items() if isinstance(d := (r.meta or {}).get("digest"), str)}
        if len(set(digests.values())) > 1:
            self.error(f"sites hold different models after the final sync: {digests}")
            self.log["digest_mismatch"] = digests
        self.write_results(final=True)

    def train_round(self, rnd: int) -> None:
        sites = self.sample(rnd)
        to_score = sites if rnd % self.sel_gap == 0 else [s for s in sites if s not in self.assigned]
        score_record = None
        if to_score:
            results, score_record = self.run_task("score", to_score, rnd)
            for site in sorted(results):
                entry = score_record["sites"][site]
                if self.vet(rnd, site, entry, lambda: self.vet_scores(rnd, site, results[site], entry), "scores") is None:
                    self.site_scores.pop(site, None)
                    self.assigned.pop(site, None)
            digests = {s: e["digest"] for s, e in score_record["sites"].items() if isinstance(e.get("digest"), str)}
            if len(set(digests.values())) > 1:  # each site should have installed the whole global
                self.error(f"round {rnd}: sites scored different models: {digests}")
        skipped = {s for s, e in (score_record or {"sites": {}})["sites"].items() if e.get("rejected") or e.get("missing")}
        participants = [s for s in sites if s in self.site_scores and s not in skipped]
        self.require(rnd, participants, sites, "site(s) with valid scores")
        if to_score:
            try:
                self.select(rnd, participants)
            except SelectionError as e:
                raise JobFailed(f"round {rnd}: layer selection failed: {e}") from None
        results, record = self.run_task("train", participants, rnd)
        if score_record:
            fold_score_bytes(record, score_record)
        accepted = []
        for site in sorted(results):
            update = self.vet(rnd, site, record["sites"][site], lambda: self.vet_update(site, results[site]))
            if update is not None:
                accepted.append(update)
        self.require(rnd, [a[0] for a in accepted], participants)
        trained = [a for a in accepted if a[2]]
        if trained:
            for layer in self.aggregator.aggregate([a[1] for a in trained], [a[2] for a in trained]):
                self.versions[layer] = self.versions.get(layer, 0) + 1
        record["aggregated"] = [a[0] for a in accepted]
        record["layers_updated"] = sorted({layer_of(k) for a in trained for k in a[3]})
        record["layer_versions"] = {str(k): v for k, v in sorted(self.versions.items())}
        self.log["rounds"].append(record)
        self.info(f"round {rnd}: averaged layers {record['layers_updated']} over {len(trained)} site(s)")

    def run_task(self, task: str, sites: list[str], rnd: int) -> tuple[dict, dict]:
        """Send each site the global layers it lacks (and its task's extras); wait for all."""
        results: dict[str, FLModel] = {}
        record = {"round": rnd, "task": task, "sites": {s: {} for s in sites}}

        def on_result(result: FLModel) -> bool:
            site, _ = self.receive(result, record, RESULT_META)
            versions = (result.meta or {}).get("layer_versions")
            if isinstance(versions, dict):
                try:
                    self.site_versions[site] = {int(k): int(v) for k, v in versions.items()}
                except (TypeError, ValueError):
                    self.site_versions.pop(site, None)
            results[site] = result
            return True

        final = task == "validate"
        for site in sites:
            have = self.site_versions.get(site, {})
            stale = sorted(l for l, v in self.versions.items() if (final and self.aggregator.encrypted) or v > have.get(l, 0))
            meta = {"round": rnd, "num_rounds": self.num_rounds, "mode": self.mode,
                    "layer_versions": {str(l): self.versions[l] for l in stale}}
            if task == "score":
                meta["criterion"] = SCORE_CRITERION.get(self.selection, "grad_norm")
            if task == "train":
                meta["layers"] = list(self.assigned.get(site, []))
                record["sites"][site]["assigned"] = meta["layers"]
            plan = self.aggregator.plan(self.final_spec() if final else None)
            if plan is not None:
                meta["he"] = plan
            data = FLModel(params=self.aggregator.payload(stale), params_type=ParamsType.FULL, current_round=rnd,
                           total_rounds=self.num_rounds, meta=meta)
            self.send(task, data, [site], record, on_result)
        self.wait_tasks()
        for site in sites:
            if site not in results:
                self.warning(f"round {rnd}: no {task} result from {site}")
                record["sites"][site]["missing"] = True
                self.site_versions.pop(site, None)  # it may have restarted from the base model: send it every layer
        return results, record

    def vet_scores(self, rnd: int, site: str, result: FLModel, entry: dict) -> bool:
        """Accept a site's scores and budget (raises: the site sits this round out)."""
        meta = result.meta or {}
        k = self.K if self.K is not None else meta.get("num_layers")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 100_000:
            raise SelectionError(f"site {site!r}: num_layers: expected an integer in [1, 100000], got {k!r}")
        scores = meta.get("scores")
        if not isinstance(scores, (list, tuple)):
            raise SelectionError(f"site {site!r}: scores: expected a list of {k} numbers, got {str(scores)[:80]}")
        if len(scores) != k:  # before check_scores converts an arbitrarily long list
            raise SelectionError(f"site {site!r}: scores: expected {k} numbers (one per layer), got {len(scores)}")
        check_scores([list(scores)], [site], k)
        budget = meta.get("budget")
        check_budgets([budget], 1, check_costs(self.costs, k), [site])
        declared = self.site_budgets.get(site)
        if declared is not None and budget > declared:
            self.warning(f"round {rnd}: {site} reported budget {budget} above the job's {declared}; using {declared}")
            budget = declared
        if self.K is None:
            self.K = self.log["num_layers"] = k
        entry["scores"] = [float(x) for x in scores]
        entry["budget"] = int(budget)
        self.site_scores[site] = (entry["scores"], int(budget))
        return True

    def select(self, rnd: int, sites: list[str]) -> None:
        scores = [self.site_scores[s][0] for s in sites]
        budgets = [self.site_scores[s][1] for s in sites]
        start = time.perf_counter()
        mask = choose_layers(self.selection, budgets, self.K, scores=scores, lam=self.lam, costs=self.costs,
                             seed=self.seed * 1000003 + rnd, sites=sites)
        seconds = time.perf_counter() - start
        for site, row in zip(sites, mask):
            self.assigned[site] = [int(l) for l in np.nonzero(row.numpy())[0]]
        g = normalize_scores(np.asarray(scores, dtype=np.float64))
        m = mask.numpy()
        solver = self.selection
        if solver == "selective":
            solver = "exact" if exact_work(np.asarray(budgets), check_costs(self.costs, self.K), len(sites)) \
                <= EXACT_WORK_LIMIT else "heuristic"
        entry = {
            "round": rnd, "sites": list(sites), "criterion": self.selection, "lam": self.lam,
            "budgets": dict(zip(sites, budgets)), "scores": dict(zip(sites, scores)),
            "layers": {s: self.assigned[s] for s in sites},
            # on the reported scores normalised to mean 1 per site (for rgn/snr: their criterion)
            "objective": objective(m, g, self.lam),
            "captured": {s: float((g[i] * m[i]).sum() / self.K) for i, s in enumerate(sites)},
            "inconsistency": inconsistency(m), "layer_counts": [int(c) for c in m.sum(axis=0)],
            "solver": solver, "seconds": seconds,
        }
        self.log["selections"].append(entry)
        self.info(f"round {rnd}: layers {entry['layers']} (inconsistency {entry['inconsistency']}, "
                  f"{seconds * 1e3:.1f} ms)")

    def vet_update(self, site: str, result: FLModel) -> tuple:
        """(site, what is aggregated, num_examples, the checked tensors) for an accepted update."""
        meta = result.meta or {}
        assigned = self.assigned.get(site, [])
        checked, state = self.aggregator.vet(result.params) if result.params else ({}, {})
        n = meta.get("num_examples") if assigned else 0
        if assigned:
            check_examples(n, self.max_examples)
            if not checked:
                raise InvalidUpdate(f"empty update; assigned layers {assigned}")
        if checked:
            validate_layer_update(checked, assigned, known_shapes=self.known_shapes, layer_keys=self.layer_keys)
            self.known_shapes.update({k: tuple(v.shape) for k, v in checked.items()})
            if self.layer_keys is None:
                first = layer_of(next(iter(checked)))
                self.layer_keys = {relative_key(k) for k in checked if layer_of(k) == first}
        return site, state, n, checked

    def final_spec(self) -> dict:
        return {"writer": "layers", "mode": self.mode, "num_layers": self.K, "scaling": self.scaling,
                "base_model": self.base_model}

    def write_results(self, final: bool = False) -> None:
        self.log.update(self.aggregator.save(self.out, final, self.final_spec()))
        self.write_json("metrics.json", self.log)


def fold_score_bytes(record: dict, score_record: dict) -> None:
    """A round's communication = its score task + its train task; plus what the scores came with."""
    for site, entry in record["sites"].items():
        scored = score_record["sites"].get(site, {})
        for key in ("upload_bytes", "download_bytes"):
            if key in scored:
                entry["score_" + key] = scored[key]
                entry[key] = entry.get(key, 0) + scored[key]
        for key in ("scores", "budget", "budget_configured", "budget_cap"):
            if key in scored:
                entry[key] = scored[key]
        for key in ("rejected", "digest"):  # named apart from the train task's own
            if key in scored:
                entry["score_" + key] = scored[key]
