"""Server workflow for one-shot federated fine-tuning: one round, results folded in as they arrive.

Every site trains once from the pretrained base and reports once. Each accepted result is folded
into the global model on arrival (``flare_lora.components.algorithms.one_shot``: running average, or
incremental FLoRA stacking), and the intermediate global is written to the run dir together with
the sites it contains, so an interrupted job still leaves the best model so far. The job finishes
when every site reported, or once the deadline passed with at least ``min_sites`` folded in (then
it keeps folding late arrivals for ``late_grace`` seconds). Nothing is sent back to the sites
unless ``evaluate_global`` asks for a measurement of the final model.
"""

from __future__ import annotations

import json
import os
import threading
import time

import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.model_controller import ModelController
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.fuel.utils import fobs
from safetensors.torch import save_file

from flare_lora.components.adapter_export import save_adapter
from flare_lora.components.algorithms.lora_state import InvalidUpdate, validate_lora_update
from flare_lora.components.algorithms.one_shot import OnlineAverage, OnlineStack
from flare_lora.components.flare.controller import RESULTS_DIRNAME, wire_bytes
from flare_lora.components.methods import ONE_SHOT_METHODS
from flare_lora.privacy.he_context import SERVER_CONTEXT, HEContextError
from flare_lora.privacy.he_server import OneShotHE, open_server_context


def check_one_shot_options(method: str, num_sites: int, min_sites: int, deadline: float, late_grace: float,
                           timeout: float | None) -> None:
    """Config errors before anything starts (key, expected vs got)."""
    if method not in ONE_SHOT_METHODS:
        raise ValueError(f"method: expected one of {list(ONE_SHOT_METHODS)}, got {method!r}")
    if not isinstance(min_sites, int) or not 1 <= min_sites <= num_sites:
        raise ValueError(f"min_sites: expected an int in [1, {num_sites}] (the number of sites), got {min_sites!r}")
    if not deadline > 0:
        raise ValueError(f"deadline: expected seconds > 0, got {deadline!r}")
    if not late_grace >= 0:
        raise ValueError(f"late_grace: expected seconds >= 0, got {late_grace!r}")
    if timeout is not None and not timeout >= deadline:
        raise ValueError(f"timeout: expected seconds >= deadline ({deadline}), got {timeout!r}")


class OneShotController(ModelController):
    def __init__(
        self,
        method: str = "flora",
        sites: list[str] | None = None,
        min_sites: int = 1,
        deadline: float = 3600.0,
        late_grace: float = 0.0,
        timeout: float | None = None,
        evaluate_global: bool = False,
        site_configs: dict | None = None,
        base_model: str = "",
        wait_for_clients_timeout: float = 300.0,
        server_threads: int | None = 1,
        he: bool = False,
        he_context: str = SERVER_CONTEXT,
    ):
        """Args:
        method: "flora" (incremental stacking), "fedit" (running average of the LoRA factors) or
            "full" (running average of full weights).
        sites: the sites the job expects (default: whoever is connected at the start).
        min_sites: fewest folded-in results the job may finish with at the deadline.
        deadline: seconds after the train task went out; from then on the job finishes as soon as
            min_sites results are in.
        late_grace: seconds after that point during which late results are still folded in.
        timeout: seconds after which the job gives up waiting for min_sites and fails
            (default 3 x deadline).
        evaluate_global: send the final global, for evaluation only, to the sites whose results it holds.
        site_configs: {site: {"rank": r, "alpha": a, ...}}; LoRA results must match their site's rank.
        he / he_context: fold ciphertexts (privacy/he_server.py, docs/he.md) as in LoraController;
            the final global then always goes back to the sites, which decrypt and write it.
        """
        super().__init__(persistor_id="", ignore_result_error=True)
        n = len(sites) if sites else max(min_sites, 1)
        check_one_shot_options(method, n, min_sites, deadline, late_grace, timeout)
        self.method = method  # FLARE's job export reads constructor args back from same-named attributes
        self.sites = sites
        self.min_sites = min_sites
        self.deadline = deadline
        self.late_grace = late_grace
        self.timeout = timeout
        self.evaluate_global = evaluate_global
        self.site_configs = site_configs or {}
        self.base_model = base_model
        self.wait_for_clients_timeout = wait_for_clients_timeout
        self.server_threads = server_threads
        self.he = he
        self.he_context = he_context

    def run(self) -> None:
        fobs.register(TensorDecomposer)
        if self.server_threads:
            torch.set_num_threads(self.server_threads)
        self.fold = OnlineStack() if self.method == "flora" else OnlineAverage()
        self.lock = threading.Lock()
        self.done = False  # set once the job stops folding
        self.scaling: float | None = None  # fedit: the one alpha/rank every site must share
        self.out = os.path.join(self.get_run_dir(), RESULTS_DIRNAME)
        os.makedirs(self.out, exist_ok=True)
        self.he_fold = None
        if self.he:  # no secret key at the server; a missing context fails the job before training
            try:
                self.fold = self.he_fold = OneShotHE(open_server_context(self.he_context, self.fl_ctx), self.method)
            except (HEContextError, ValueError) as e:
                self.log = {"method": self.method, "protocol": "one_shot", "rounds": [], "final": {}}
                self._fail(f"HE: {e}")
                return
        sites = self._wait_for_sites()
        if sites is None:
            return
        self.record = {"round": 0, "task": "train", "sites": {s: {} for s in sites}, "aggregated": []}
        self.log = {"method": self.method, "protocol": "one_shot", "num_rounds": 1, "rounds": [self.record],
                    "final": {}, "arrivals": []}
        if self.he_fold:
            self.log["he"] = self.he_fold.describe()
        self.start = time.time()
        data = FLModel(params={}, params_type=ParamsType.FULL, current_round=0, total_rounds=1,
                       meta={"method": self.method, "round": 0, "num_rounds": 1, "one_shot": True})
        if self.he_fold:
            data.meta["he"] = self.he_fold.plan()
        nbytes = wire_bytes(data)
        for site in sites:
            self.record["sites"][site]["download_bytes"] = nbytes
        self.send_model(task_name="train", data=data, targets=sites, callback=self._on_result)
        self._wait(sites)
        self.cancel_all_tasks()
        with self.lock:
            folded = list(self.fold.sites)
            missing = sorted(set(sites) - set(folded))
            for site in missing:
                self.record["sites"][site].setdefault("missing", True)
            if missing:
                self.warning(f"one-shot: finishing without {missing}; global holds {folded}")
            if len(folded) < self.min_sites:
                self._fail(f"one-shot: {len(folded)} valid result(s) from {folded}, min_sites={self.min_sites}; "
                           f"rejected or missing: {missing}")
                return
            self.done = True  # results arriving from now on are logged, not folded
        self._finish(folded)

    def _wait_for_sites(self) -> list[str] | None:
        give_up = time.time() + self.wait_for_clients_timeout
        while True:
            connected = sorted(c.name for c in self.engine.get_clients())
            wanted = self.sites or connected
            if connected and set(wanted) <= set(connected):
                return sorted(wanted)
            if time.time() > give_up or self.abort_signal.triggered:
                self.log = {"method": self.method, "protocol": "one_shot", "rounds": [], "final": {}}
                self._fail(f"one-shot: sites {sorted(set(wanted) - set(connected))} never connected "
                           f"(waited {self.wait_for_clients_timeout:.0f}s)")
                return None
            time.sleep(1.0)

    def _wait(self, sites: list[str]) -> None:
        """Until all reported, or past the deadline with min_sites in (plus the grace window)."""
        timeout = self.timeout if self.timeout is not None else 3 * self.deadline
        finish_at = None
        while self.get_num_standing_tasks() and not self.abort_signal.triggered:
            elapsed = time.time() - self.start
            with self.lock:
                folded = len(self.fold.sites)
            if finish_at is None and elapsed >= self.deadline and folded >= self.min_sites:
                finish_at = elapsed + self.late_grace
                waiting = sorted(set(sites) - set(self.fold.sites) - set(self._rejected()))
                self.info(f"one-shot: deadline {self.deadline:.0f}s passed with {folded} result(s); "
                          f"waiting up to {self.late_grace:.0f}s more for {waiting}")
            if (finish_at is not None and elapsed >= finish_at) or elapsed >= timeout:
                return
            time.sleep(min(self._task_check_period, 0.5))

    def _rejected(self) -> list[str]:
        return [s for s, e in self.record["sites"].items() if e.get("rejected")]

    def _on_result(self, result: FLModel) -> bool:
        """Vet and fold one arrival, then persist the new intermediate global."""
        site = result.meta.get("client_name", "?")
        meta = result.meta or {}
        with self.lock:
            entry = self.record["sites"].setdefault(site, {})
            entry.update(upload_bytes=wire_bytes(result), metrics=dict(result.metrics or {}),
                         arrived_s=round(time.time() - self.start, 3))
            for key in ("num_examples", "rank", "alpha", "train"):
                if key in meta:
                    entry[key] = meta[key]
            if self.done:
                entry["late"] = "arrived after the job finished; not folded in"
                self.warning(f"one-shot: result from {site} arrived after the job finished; not folded in")
                return False
            try:
                self._fold(site, dict(result.params or {}), meta)
            except (InvalidUpdate, TypeError, ValueError) as e:
                self.error(f"one-shot: rejected result from {site}: {e}")
                entry["rejected"] = str(e)
                return False
            entry.pop("missing", None)
            self.record["aggregated"] = list(self.fold.sites)
            self.log["arrivals"].append({"site": site, "arrived_s": entry["arrived_s"], "global_sites": list(self.fold.sites)})
            self._persist_global()
            self.info(f"one-shot: folded {site} in; global now holds {self.fold.sites}")
        return True

    def _fold(self, site: str, state: dict, meta: dict) -> None:
        declared = self.site_configs.get(site, {})
        weight = meta.get("num_examples", 0)
        if self.he_fold:  # only the layout can be vetted; the ciphertexts are folded as they are
            self.he_fold.fold(site, state, weight, declared.get("rank", meta.get("rank")),
                              float(declared.get("alpha", meta.get("alpha", 0.0))))
            return
        if self.method == "full":
            self.fold.add(state, weight, site)
            return
        rank = declared.get("rank", meta.get("rank"))
        alpha = float(declared.get("alpha", meta.get("alpha", 0.0)))
        if not isinstance(rank, int) or rank <= 0 or not alpha > 0:
            raise InvalidUpdate(f"declared rank / alpha must be positive, got {rank!r} / {alpha!r}")
        if self.method == "flora":
            self.fold.add(state, weight, alpha / rank, site, rank=rank)
            return
        validate_lora_update(state, rank=rank)
        scaling = alpha / rank if self.scaling is None else self.scaling
        if abs(alpha / rank - scaling) > 1e-12:
            raise InvalidUpdate(f"fedit needs one alpha/rank across sites: {alpha / rank} vs {scaling}")
        self.fold.add(state, weight, site)
        self.scaling = scaling

    def _global(self) -> tuple[dict, float | None]:
        """The current aggregate and the scaling it is applied with (None: full weights)."""
        if self.method == "full":
            return self.fold.result(), None
        return self.fold.result(), (1.0 if self.method == "flora" else self.scaling)

    def _persist_global(self) -> None:
        if self.he_fold:  # the server's copy of the global stays ciphertext
            self.log["he"]["persisted"] = self.he_fold.persist(self.out)
        else:
            state, _ = self._global()
            tmp = os.path.join(self.out, "global.safetensors.tmp")
            save_file({k: v.contiguous() for k, v in state.items()}, tmp)
            os.replace(tmp, os.path.join(self.out, "global.safetensors"))
        info = {"method": self.method, "sites": list(self.fold.sites), "arrivals": len(self.log["arrivals"])}
        self._write_json("global.json", info)
        self._write_json("metrics.json", self.log)

    def _finish(self, folded: list[str]) -> None:
        if self.he_fold:  # only the sites can decrypt: they get the global and write the final model
            self.log["model_at_sites"] = f"{RESULTS_DIRNAME}/ in each site's run directory"
            self.log["final"] = self._evaluate(None, folded)
            self.info(f"one-shot: done with {folded} in {time.time() - self.start:.1f}s")
            self._write_json("metrics.json", self.log)
            return
        state, scaling = self._global()
        if scaling is None:
            self.log["full_weights"] = "global.safetensors"
        else:
            save_adapter(os.path.join(self.out, "adapter"), state, scaling, self.base_model)
            self.log["adapter"] = "adapter"
        final = {"round": 1, "task": "none", "sites": {s: {} for s in folded}}
        if self.evaluate_global:
            final = self._evaluate(state, folded)
        self.log["final"] = final
        self.info(f"one-shot: done with {folded} in {time.time() - self.start:.1f}s")
        self._write_json("metrics.json", self.log)

    def _evaluate(self, state: dict, folded: list[str]) -> dict:
        """The sites whose results are in the global (and still connected) evaluate it; a site
        that died mid-training may still count as connected, and waiting for it would hang."""
        connected = sorted(c.name for c in self.engine.get_clients() if c.name in folded)
        if self.he_fold:
            params = self.he_fold.payload()
        else:
            params = {f"r0/{k}": v for k, v in state.items()} if self.method == "flora" else state
        data = FLModel(params=params, params_type=ParamsType.FULL, current_round=1, total_rounds=1,
                       meta={"method": self.method, "round": 1, "num_rounds": 1})
        if self.he_fold:
            data.meta["he"] = self.he_fold.plan(self.he_fold.final_spec(self.base_model))
        nbytes = wire_bytes(data)
        record = {"round": 1, "task": "validate", "sites": {s: {"download_bytes": nbytes} for s in connected}}
        results = self.send_model_and_wait(task_name="validate", data=data, targets=connected)
        for result in results:
            site = result.meta.get("client_name", "?")
            record["sites"].setdefault(site, {})["metrics"] = dict(result.metrics or {})
        return record

    def _fail(self, reason: str) -> None:
        self.log["error"] = reason
        self._write_json("metrics.json", self.log)
        self.panic(reason)

    def _write_json(self, name: str, data: dict) -> None:
        tmp = os.path.join(self.out, name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, default=str)
        os.replace(tmp, os.path.join(self.out, name))
