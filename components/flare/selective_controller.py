"""Server workflow for selective-layer federated fine-tuning.

Each round: (every ``sel_gap`` rounds, or when a sampled site has no selection yet) a "score" task
collects K layer scores and a layer budget from every sampled site; the server picks each site's
layers (``flare_lora.components.algorithms.layer_selection.choose_layers``: the consistency-regularised
solver or a baseline); a "train" task carries each site's layer list; the server vets every
update (a layer it was not assigned, a missing layer, NaN/Inf, a changed shape: rejected and
logged, the round goes on) and averages each layer over the sites that trained it
(``flare_lora.components.algorithms.layer_average``). Layers nobody trained keep their global value.

Every task ships a site only the global layers that changed since the version it last reported,
so a site's model is always the global model. A final "validate" task evaluates it everywhere and
collects a digest of each site's weights (all equal when the job is consistent).

Results in the run dir (``flare_lora/``): metrics.json (rounds, selections with scores, budgets,
layers, objective and captured gradient mass; rejected updates with the reason) and the final
global layers — a PEFT adapter (lora mode) or ``layers.safetensors`` (full mode).
"""

from __future__ import annotations

import json
import os
import random
import time

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.model_controller import ModelController
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.fuel.utils import fobs

from flare_lora.components.algorithms.layer_average import (
    average_layers,
    layer_of,
    relative_key,
    validate_layer_update,
)
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
from flare_lora.components.flare.controller import RESULTS_DIRNAME, wire_bytes
from flare_lora.privacy.he_context import SERVER_CONTEXT, HEContextError
from flare_lora.privacy.he_server import LayerHE, open_server_context

SCORE_CRITERION = {"selective": "grad_norm", "rgn": "rgn", "snr": "snr"}  # others log grad norms


class SelectiveController(ModelController):
    def __init__(
        self,
        num_rounds: int = 3,
        selection: str = "selective",
        mode: str = "lora",
        lam: float = 0.0,
        sel_gap: int = 1,
        min_clients: int = 1,
        clients_per_round: int | None = None,
        site_budgets: dict | None = None,
        num_layers: int | None = None,
        costs: list | None = None,
        scaling: float = 1.0,
        base_model: str = "",
        seed: int = 0,
        task_timeout: int = 0,
        wait_for_clients_timeout: float = 300.0,
        he: bool = False,
        he_context: str = SERVER_CONTEXT,
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
        he / he_context: aggregate ciphertexts, each layer over the sites that trained it
            (privacy/he_server.py, docs/he.md); the sites write the final model. As in LoraController.
        """
        super().__init__(persistor_id="", ignore_result_error=True)
        if selection not in CRITERIA:
            raise ValueError(f"selection: expected one of {list(CRITERIA)}, got {selection!r}")
        if mode not in ("lora", "full"):
            raise ValueError(f"mode: expected 'lora' or 'full', got {mode!r}")
        # FLARE's job export reads constructor args back from same-named attributes
        self.num_rounds = num_rounds
        self.selection = selection
        self.mode = mode
        self.lam = lam
        self.sel_gap = sel_gap
        self.min_clients = min_clients
        self.clients_per_round = clients_per_round
        self.site_budgets = site_budgets or {}
        self.num_layers = num_layers
        self.costs = costs
        self.scaling = scaling
        self.base_model = base_model
        self.seed = seed
        self.task_timeout = task_timeout
        self.wait_for_clients_timeout = wait_for_clients_timeout
        self.he = he
        self.he_context = he_context

    # --- the workflow --------------------------------------------------------------------

    def run(self) -> None:
        fobs.register(TensorDecomposer)
        self.global_state: dict = {}  # wire key -> tensor, for layers trained at least once
        self.versions: dict[int, int] = {}  # layer -> times aggregated
        self.site_versions: dict[str, dict[int, int]] = {}
        self.site_scores: dict[str, tuple[list[float], int]] = {}  # latest (scores, budget)
        self.assigned: dict[str, list[int]] = {}
        self.known_shapes: dict = {}
        self.layer_keys: set[str] | None = None
        self.K = self.num_layers
        self.log = {
            "method": "selective", "selection": self.selection, "mode": self.mode, "lam": self.lam,
            "sel_gap": self.sel_gap, "num_rounds": self.num_rounds, "num_layers": self.K,
            "rounds": [], "selections": [], "final": {},
        }
        rng = random.Random(self.seed)
        self.he_layers = None  # HE: the encrypted global, by layer
        if self.he:
            try:
                self.he_layers = LayerHE(open_server_context(self.he_context, self.fl_ctx))
            except HEContextError as e:
                self._fail(f"HE: {e}")
                return
            self.log["he"] = self.he_layers.describe()
        for rnd in range(self.num_rounds):
            sites = self._sample(rnd, rng)
            if sites is None:
                return
            selecting = rnd % self.sel_gap == 0
            to_score = sites if selecting else [s for s in sites if s not in self.assigned]
            score_record = None
            if to_score:
                results, score_record = self._run_task("score", to_score, rnd)
                for site in to_score:
                    if site in results:
                        self._vet_scores(rnd, site, results[site], score_record)
                digests = {s: e["digest"] for s, e in score_record["sites"].items() if e.get("digest")}
                if len(set(digests.values())) > 1:  # each site should have installed the whole global
                    self.error(f"round {rnd}: sites scored different models: {digests}")
            participants = [s for s in sites if s in self.site_scores
                            and not (score_record and score_record["sites"].get(s, {}).get("rejected"))
                            and not (score_record and score_record["sites"].get(s, {}).get("missing"))]
            if len(participants) < self.min_clients:
                self._fail(f"round {rnd}: {len(participants)} site(s) with valid scores {participants}, "
                           f"min_clients={self.min_clients}")
                return
            if to_score:
                try:
                    self._select(rnd, participants)
                except SelectionError as e:
                    self._fail(f"round {rnd}: layer selection failed: {e}")
                    return
            results, record = self._run_task("train", participants, rnd)
            if score_record:
                self._fold_score_bytes(record, score_record)
            accepted = []
            for site in sorted(results):
                update = self._vet_update(rnd, site, results[site], record)
                if update is not None:
                    accepted.append(update)
            trained = [a for a in accepted if a[1]]
            if len(accepted) < self.min_clients:
                self._fail(
                    f"round {rnd}: {len(accepted)} valid update(s) from {[a[0] for a in accepted]}, "
                    f"min_clients={self.min_clients}; rejected or missing: "
                    f"{sorted(set(participants) - {a[0] for a in accepted})}"
                )
                return
            if trained and self.he_layers:
                for layer in self.he_layers.aggregate([a[1] for a in trained], [a[2] for a in trained]):
                    self.versions[layer] = self.versions.get(layer, 0) + 1
            elif trained:
                new = average_layers([a[1] for a in trained], [a[2] for a in trained])
                self.global_state.update({k: v.contiguous() for k, v in new.items()})
                for layer in sorted({layer_of(k) for k in new}):
                    self.versions[layer] = self.versions.get(layer, 0) + 1
            record["aggregated"] = [a[0] for a in accepted]
            record["layers_updated"] = sorted({layer_of(k) for a in trained for k in a[1]})
            record["layer_versions"] = {str(k): v for k, v in sorted(self.versions.items())}
            self.log["rounds"].append(record)
            self.info(f"round {rnd}: averaged layers {record['layers_updated']} over {len(trained)} site(s)")
            self._write_results()

        connected = sorted(c.name for c in self.engine.get_clients())
        results, record = self._run_task("validate", connected, self.num_rounds)
        self.log["final"] = record
        digests = {s: (r.meta or {}).get("digest") for s, r in results.items() if (r.meta or {}).get("digest")}
        if len(set(digests.values())) > 1:
            self.error(f"sites hold different models after the final sync: {digests}")
            self.log["digest_mismatch"] = digests
        self._write_results(final=True)

    # --- steps ---------------------------------------------------------------------------

    def _sample(self, rnd: int, rng: random.Random) -> list[str] | None:
        deadline = time.time() + self.wait_for_clients_timeout
        while True:
            clients = sorted(c.name for c in self.engine.get_clients())
            if len(clients) >= self.min_clients:
                break
            if time.time() > deadline or self.abort_signal.triggered:
                self._fail(f"round {rnd}: only {len(clients)} site(s) connected {clients}, "
                           f"min_clients={self.min_clients} (waited {self.wait_for_clients_timeout:.0f}s)")
                return None
            time.sleep(1.0)
        k = self.clients_per_round
        return clients if not k or k >= len(clients) else sorted(rng.sample(clients, max(k, self.min_clients)))

    def _payload(self, site: str) -> tuple[dict, dict]:
        """The global layers ``site`` lacks, and their versions."""
        have = self.site_versions.get(site, {})
        stale = {l for l, v in self.versions.items() if v > have.get(l, 0)}
        params = {k: v for k, v in self.global_state.items() if layer_of(k) in stale}
        return params, {str(l): self.versions[l] for l in sorted(stale)}

    def _run_task(self, task: str, sites: list[str], rnd: int) -> tuple[dict, dict]:
        results: dict[str, FLModel] = {}
        record = {"round": rnd, "task": task, "sites": {s: {} for s in sites}}

        def on_result(result: FLModel) -> bool:
            meta = result.meta or {}
            site = meta.get("client_name", "?")
            entry = record["sites"].setdefault(site, {})
            entry["upload_bytes"] = wire_bytes(result)
            entry["metrics"] = dict(result.metrics or {})
            for key in ("num_examples", "layers", "train", "digest", "budget", "budget_configured",
                        "budget_cap", "criterion", "score_seconds"):
                if key in meta:
                    entry[key] = meta[key]
            versions = meta.get("layer_versions")
            if isinstance(versions, dict):
                try:
                    self.site_versions[site] = {int(k): int(v) for k, v in versions.items()}
                except (TypeError, ValueError):
                    pass
            results[site] = result
            return True

        for site in sites:
            params, versions = self._payload(site)
            meta = {"round": rnd, "num_rounds": self.num_rounds, "layer_versions": versions, "mode": self.mode}
            if task == "score":
                meta["criterion"] = SCORE_CRITERION.get(self.selection, "grad_norm")
            if task == "train":
                meta["layers"] = list(self.assigned.get(site, []))
                record["sites"][site]["assigned"] = meta["layers"]
            data = FLModel(params=params, params_type=ParamsType.FULL, current_round=rnd,
                           total_rounds=self.num_rounds, meta=meta)
            if self.he_layers:  # ciphertexts of the layers it lacks (the final task: all, to write the model)
                final = task == "validate"
                data.params = self.he_layers.payload(self.versions if final else versions)
                data.meta["he"] = self.he_layers.plan({"writer": "layers", "mode": self.mode, "num_layers": self.K,
                                                       "scaling": self.scaling, "base_model": self.base_model}
                                                      if final else None)
            record["sites"][site]["download_bytes"] = wire_bytes(data)
            self.send_model(task_name=task, data=data, targets=[site], timeout=self.task_timeout, callback=on_result)
        while self.get_num_standing_tasks():
            if self.abort_signal.triggered:
                break
            time.sleep(self._task_check_period)
        for site in sites:
            if site not in results:
                self.warning(f"round {rnd}: no {task} result from {site}")
                record["sites"][site]["missing"] = True
                self.site_versions.pop(site, None)  # it may have restarted from the base model: send it every layer
        return results, record

    def _vet_scores(self, rnd: int, site: str, result: FLModel, record: dict) -> None:
        """Accept a site's scores and budget, or log why not (the site sits this round out)."""
        meta = result.meta or {}
        entry = record["sites"][site]
        try:
            if self.K is None:
                k = meta.get("num_layers")
                if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                    raise SelectionError(f"site {site!r}: num_layers: expected an integer >= 1, got {k!r}")
                self.K = k
                self.log["num_layers"] = k
            scores = meta.get("scores")
            if not isinstance(scores, (list, tuple)):
                raise SelectionError(f"site {site!r}: scores: expected a list of {self.K} numbers, got {scores!r}")
            check_scores([list(scores)], [site], self.K)
            budget = meta.get("budget")
            check_budgets([budget], 1, check_costs(self.costs, self.K), [site])
            declared = self.site_budgets.get(site)
            if declared is not None and budget > declared:
                self.warning(f"round {rnd}: {site} reported budget {budget} above the job's {declared}; using {declared}")
                budget = declared
        except SelectionError as e:
            self.error(f"round {rnd}: rejected scores from {site}: {e}")
            entry["rejected"] = str(e)
            self.site_scores.pop(site, None)
            self.assigned.pop(site, None)
            return
        entry["scores"] = [float(x) for x in scores]
        entry["budget"] = int(budget)
        self.site_scores[site] = ([float(x) for x in scores], int(budget))

    def _select(self, rnd: int, sites: list[str]) -> None:
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
        k = self.K
        entry = {
            "round": rnd,
            "sites": list(sites),
            "criterion": self.selection,
            "lam": self.lam,
            "budgets": dict(zip(sites, budgets)),
            "scores": dict(zip(sites, scores)),
            "layers": {s: self.assigned[s] for s in sites},
            # on the reported scores normalised to mean 1 per site (for rgn/snr: their criterion)
            "objective": objective(m, g, self.lam),
            "captured": {s: float((g[i] * m[i]).sum() / k) for i, s in enumerate(sites)},
            "inconsistency": inconsistency(m),
            "layer_counts": [int(c) for c in m.sum(axis=0)],
            "solver": ("exact" if exact_work(np.asarray(budgets), check_costs(self.costs, k), len(sites))
                       <= EXACT_WORK_LIMIT else "heuristic") if self.selection == "selective" else self.selection,
            "seconds": seconds,
        }
        self.log["selections"].append(entry)
        self.info(f"round {rnd}: layers {entry['layers']} (inconsistency {entry['inconsistency']}, "
                  f"{seconds * 1e3:.1f} ms)")

    def _vet_update(self, rnd: int, site: str, result: FLModel, record: dict):
        """(site, state, num_examples) for an accepted update, or None (logged, round goes on)."""
        meta = result.meta or {}
        assigned = self.assigned.get(site, [])
        state, encrypted = dict(result.params or {}), None
        try:
            if self.he_layers and state:  # only the layout can be vetted: its shapes go through the same checks
                encrypted, state = self.he_layers.vet(result.params)
            if assigned:
                n = meta.get("num_examples")
                if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
                    raise InvalidUpdate(f"declared num_examples must be a positive int, got {n!r}")
                if not state:
                    raise InvalidUpdate(f"empty update; assigned layers {assigned}")
            else:
                n = 0
            if state:
                validate_layer_update(state, assigned, known_shapes=self.known_shapes, layer_keys=self.layer_keys)
        except (InvalidUpdate, TypeError, ValueError) as e:
            self.error(f"round {rnd}: rejected update from {site}: {e}")
            record["sites"][site]["rejected"] = str(e)
            return None
        self.known_shapes.update({k: tuple(v.shape) for k, v in state.items()})
        if state and self.layer_keys is None:
            self.layer_keys = {relative_key(k) for k in state if layer_of(k) == layer_of(next(iter(state)))}
        return site, (encrypted if encrypted is not None else state), n

    @staticmethod
    def _fold_score_bytes(record: dict, score_record: dict) -> None:
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

    def _fail(self, reason: str) -> None:
        self.log["error"] = reason
        self._write_results()
        self.panic(reason)

    # --- results -------------------------------------------------------------------------

    def _write_results(self, final: bool = False) -> None:
        out = os.path.join(self.get_run_dir(), RESULTS_DIRNAME)
        os.makedirs(out, exist_ok=True)
        if self.he_layers:  # the server's copy of the global stays ciphertext; the sites write the model
            if self.he_layers.global_.groups:
                self.log["he"]["persisted"] = self.he_layers.persist(out)
            if final:
                self.log["model_at_sites"] = f"{RESULTS_DIRNAME}/ in each site's run directory"
        elif final and self.global_state:
            self.log.update(save_global_layers(out, self.global_state, self.mode, self.K, self.scaling, self.base_model))
        tmp = os.path.join(out, "metrics.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.log, f, indent=1, default=str)
        os.replace(tmp, os.path.join(out, "metrics.json"))


def save_global_layers(out: str, state: dict, mode: str, num_layers: int, scaling: float, base_model: str) -> dict:
    """lora: a PEFT adapter (layers never trained get zero factors: no change); full:
    ``layers.safetensors`` holding the trained layers' weights under their base-model names."""
    if mode == "full":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, "layers.safetensors"),
                  metadata={"format": "pt"})
        return {"layers_file": "layers.safetensors"}
    import torch

    from flare_lora.components.adapter_export import save_adapter

    full = dict(state)
    template = {relative_key(k): v.shape for k, v in state.items()}
    for layer in range(num_layers):
        for rel, shape in template.items():
            key = rel.replace(".*.", f".{layer}.", 1)
            full.setdefault(key, torch.zeros(shape))
    save_adapter(os.path.join(out, "adapter"), full, scaling, base_model)
    return {"adapter": "adapter"}
