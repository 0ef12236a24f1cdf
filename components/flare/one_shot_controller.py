"""Server workflow for one-shot federated fine-tuning: one round, results folded in as they arrive.

Every site trains once from the pretrained base and reports once. Each accepted result is folded
into the global model on arrival (the strategy's fold: running average, or incremental FLoRA
stacking), and the intermediate global is written to the run dir together with the sites it
contains, so an interrupted job still leaves the best model so far. The job finishes when every
site reported, or once the deadline passed with at least ``min_clients`` (the job's min_sites)
folded in (then it keeps folding late arrivals for ``late_grace`` seconds). Nothing is sent back
to the sites unless ``evaluate_global`` asks for a measurement of the final model (with HE the
final global always goes back: only the sites can decrypt and write it).
"""

from __future__ import annotations

import threading
import time

from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from flare_lora.components.flare.workflow import FederatedWorkflow, JobFailed, keep_args, task_layout
from flare_lora.components.strategies import ONE_SHOT_METHODS, SharedA, SiteUpdate, check_examples, check_update, get_method
from flare_lora.components.strategies.base import DEFAULT_MAX_UPDATE_NORM, UpdateLimits, check_limits, pinned_shapes
from flare_lora.components.strategies.aggregators import PlainFold
from flare_lora.privacy.he_server import EncryptedFold

RESULT_META = ("num_examples", "rank", "alpha", "train")


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


class OneShotController(FederatedWorkflow):
    def __init__(
        self,
        method: str = "flora",
        sites: list[str] | None = None,
        deadline: float = 3600.0,
        late_grace: float = 0.0,
        timeout: float | None = None,
        evaluate_global: bool = False,
        site_configs: dict | None = None,
        module_shapes: list | None = None,
        max_update_norm: float | None = None,
        *args,
        **kwargs,
    ):
        """Args:
        method: "flora" (incremental stacking), "shared_a" (the folded B's summed on the shared A; not
            with he), "fedit" (running average of the LoRA factors) or "full" (running average of full weights).
        sites: the sites the job expects (default: whoever is connected at the start).
        deadline: seconds after the train task went out; from then on the job finishes as soon as
            min_clients results are in.
        late_grace: seconds after that point during which late results are still folded in.
        timeout: seconds after which the job gives up waiting for min_clients and fails
            (default 3 x deadline).
        evaluate_global: send the final global, for evaluation only, to the sites whose results it holds.
        site_configs: {site: {"rank": r, "alpha": a, "target_modules": [...]}}; LoRA results must
            match their site's rank and modules.
        module_shapes, max_update_norm: as in LoraController (None: its default), for the LoRA
            methods; with "full" both must be None (results are full weights, pinned to the first
            accepted one's tensors).
        args, kwargs: those of FederatedWorkflow (named so, FLARE's job export reads them too);
            min_clients is the fewest folded-in results the job may finish with; clients_per_round
            and checkpoint_dir do not apply (one round).
        """
        if kwargs.get("clients_per_round") or kwargs.get("checkpoint_dir"):
            raise ValueError("clients_per_round / checkpoint_dir: a one-shot job has one round and persists its "
                             "global after every arrival; neither applies")
        super().__init__(*args, **kwargs)
        check_one_shot_options(method, len(sites) if sites else max(self.min_clients, 1), self.min_clients,
                               deadline, late_grace, timeout)
        if method == "full" and (module_shapes is not None or max_update_norm is not None):
            raise ValueError(f"{'module_shapes' if module_shapes is not None else 'max_update_norm'}: applies to "
                             "LoRA factors; method 'full' sends full weights")
        if method == "shared_a":
            if self.he:
                raise ValueError("he: one-shot shared_a cannot fold ciphertexts; use the multi-round job")
            get_method(method).bind("", pinned_shapes(module_shapes))  # fails without the module shapes
        bound = DEFAULT_MAX_UPDATE_NORM if max_update_norm is None else max_update_norm
        check_limits(self.max_examples, bound)
        keep_args(self, locals())
        self.site_configs = site_configs or {}
        self.limits = UpdateLimits(pinned_shapes(module_shapes), self.max_examples, bound)

    def new_log(self) -> dict:
        return {"method": self.method, "protocol": "one_shot", "num_rounds": 1, "arrivals": []}

    def make_aggregator(self, ckks):
        self.strategy = get_method(self.method)
        if self.strategy.shared_a:
            self.strategy.bind(self.fl_ctx.get_job_id(), self.limits.module_shapes)
        return EncryptedFold(self.strategy, ckks) if ckks else PlainFold(self.strategy)

    def workflow(self) -> None:
        self.lock = threading.Lock()
        self.done = False  # set once the job stops folding
        self.accepted: list[SiteUpdate] = []
        wanted = set(self.sites or [])
        sites = sorted(self.sites or self.wait_for(0, bool, "none"))
        self.wait_for(0, lambda c: wanted <= set(c), f"waiting for {sorted(wanted)}")
        self.record = {"round": 0, "task": "train", "sites": {s: {} for s in sites}, "aggregated": []}
        self.log["rounds"] = [self.record]
        self.start = time.time()
        meta = {"method": self.method, "round": 0, "num_rounds": 1, "one_shot": True,
                **(task_layout(self.limits.module_shapes, self.site_configs, sites) if self.strategy.lora else {})}
        plan = self.aggregator.plan()
        if plan is not None:
            meta["he"] = plan
        if self.strategy.shared_a:
            meta[SharedA.TASK_KEY] = self.strategy.key
        data = FLModel(params={}, params_type=ParamsType.FULL, current_round=0, total_rounds=1, meta=meta)
        self.send("train", data, sites, self.record, self.on_result)
        self.wait_deadline(sites)
        self.cancel_all_tasks()
        with self.lock:
            folded = list(self.aggregator.sites)
            missing = sorted(set(sites) - set(folded))
            for site in missing:
                self.record["sites"][site].setdefault("missing", True)
            if missing:
                self.warning(f"one-shot: finishing without {missing}; global holds {folded}")
            if len(folded) < self.min_clients:
                raise JobFailed(f"one-shot: {len(folded)} valid result(s) from {folded}, min_sites={self.min_clients}; "
                                f"rejected or missing: {missing}")
            self.done = True  # results arriving from now on are logged, not folded
        self.log.update(self.aggregator.save(self.out, True, {"base_model": self.base_model}))
        final = {"round": 1, "task": "none", "sites": {s: {} for s in folded}}
        if self.evaluate_global or self.aggregator.encrypted:
            final = self.evaluate(folded)
        self.log["final"] = final
        self.info(f"one-shot: done with {folded} in {time.time() - self.start:.1f}s")
        self.write_json("metrics.json", self.log)

    def wait_deadline(self, sites: list[str]) -> None:
        """Until all reported, or past the deadline with min_clients in (plus the grace window)."""
        timeout = self.timeout if self.timeout is not None else 3 * self.deadline
        finish_at = None
        while self.get_num_standing_tasks() and not self.abort_signal.triggered:
            elapsed = time.time() - self.start
            with self.lock:
                folded = list(self.aggregator.sites)
            if finish_at is None and elapsed >= self.deadline and len(folded) >= self.min_clients:
                finish_at = elapsed + self.late_grace
                rejected = [s for s, e in self.record["sites"].items() if e.get("rejected")]
                waiting = sorted(set(sites) - set(folded) - set(rejected))
                self.info(f"one-shot: deadline {self.deadline:.0f}s passed with {len(folded)} result(s); "
                          f"waiting up to {self.late_grace:.0f}s more for {waiting}")
            if (finish_at is not None and elapsed >= finish_at) or elapsed >= timeout:
                return
            time.sleep(0.5)

    def on_result(self, result: FLModel) -> bool:
        """Vet and fold one arrival, then persist the new intermediate global."""
        with self.lock:
            site, entry = self.receive(result, self.record, RESULT_META)
            entry["arrived_s"] = round(time.time() - self.start, 3)
            if self.done:
                entry["late"] = "arrived after the job finished; not folded in"
                self.warning(f"one-shot: result from {site} arrived after the job finished; not folded in")
                return False
            if self.vet(0, site, entry, lambda: self.fold(site, result), "result") is None:
                return False
            entry.pop("missing", None)
            self.record["aggregated"] = list(self.aggregator.sites)
            self.log["arrivals"].append({"site": site, "arrived_s": entry["arrived_s"],
                                         "global_sites": list(self.aggregator.sites)})
            self.log.update(self.aggregator.save(self.out, False, {}))
            self.write_json("global.json", {"method": self.method, "sites": list(self.aggregator.sites),
                                            "arrivals": len(self.log["arrivals"])})
            self.write_json("metrics.json", self.log)
            self.info(f"one-shot: folded {site} in; global now holds {self.aggregator.sites}")
        return True

    def fold(self, site: str, result: FLModel) -> bool:
        """Check one arrival in clear (HE: on its declared shapes), then fold it in."""
        meta = result.meta or {}
        declared = self.site_configs.get(site, {})
        rank = declared.get("rank", meta.get("rank"))
        checked, state = self.aggregator.vet(result.params, rank, site)
        if self.strategy.shared_a:  # its B's with the A the server draws itself
            checked = state = self.strategy.expand(checked, 0, rank)
        update = SiteUpdate(site=site, state=checked, num_examples=meta.get("num_examples", 0), rank=rank or 1,
                            alpha=declared.get("alpha", meta.get("alpha", 0.0 if self.strategy.lora else 1.0)))
        if self.strategy.lora:
            update.rank = rank
            check_update(update, self.limits, targets=declared.get("target_modules"))
        else:
            check_examples(update.num_examples, self.max_examples)
        self.strategy.check(update, self.accepted)
        update.state = state
        self.aggregator.add(update)
        self.accepted.append(update)
        return True

    def evaluate(self, folded: list[str]) -> dict:
        """The sites whose results are in the global (and still connected) evaluate it; a site
        that died mid-training may still count as connected, and waiting for it would hang."""
        connected = sorted(c.name for c in self.engine.get_clients() if c.name in folded)
        meta = {"method": self.method, "round": 1, "num_rounds": 1}
        if self.strategy.shared_a:
            meta[SharedA.TASK_KEY] = self.strategy.key
        plan = self.aggregator.plan({"base_model": self.base_model})
        if plan is not None:
            meta["he"] = plan
        data = FLModel(params=self.aggregator.payload(), params_type=ParamsType.FULL, current_round=1,
                       total_rounds=1, meta=meta)
        record = {"round": 1, "task": "validate", "sites": {}}
        self.send("validate", data, connected, record, lambda r: bool(self.receive(r, record)))
        self.wait_tasks()
        return record
