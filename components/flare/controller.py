"""Server workflow for federated LoRA rounds (flora, shared_a, fedit, zero_pad, hlora, fedcdd).

The workflow core (workflow.py) samples, sends, waits, vets and writes; this controller adds the
rounds: it ships each site exactly the global state it lacks (grouped by how many rounds the site
has installed), vets each update through the method's strategy, aggregates the accepted ones,
checkpoints, and at the end evaluates the last global everywhere and writes the final adapter.
"""

from __future__ import annotations

from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from flare_lora.components.algorithms.lora_state import InvalidUpdate, lora_module_shapes
from flare_lora.components.flare.workflow import FederatedWorkflow, JobFailed, keep_args, task_layout
from flare_lora.components.strategies import METHODS, FLoRA, SharedA, SiteUpdate, check_update, get_method
from flare_lora.components.strategies.base import (
    DEFAULT_MAX_UPDATE_NORM,
    UpdateLimits,
    check_limits,
    check_update_norms,
    pinned_shapes,
)
from flare_lora.components.strategies.aggregators import PlainRounds
from flare_lora.privacy.he_aggregate import check_he_method
from flare_lora.privacy.he_server import EncryptedRounds

RESULT_META = ("num_examples", "rank", "alpha", "merged_rounds", "base_digest", "train")


def check_method(method: str, options: dict | None, module_shapes, he: bool) -> None:
    """At config time: unknown options, shared-A without the module shapes, a method (with its
    options) that cannot aggregate ciphertexts."""
    strategy = get_method(method, **(options or {}))
    if method == "shared_a":
        strategy.bind("", pinned_shapes(module_shapes))
    if he:
        check_he_method(strategy)


class LoraController(FederatedWorkflow):
    def __init__(
        self,
        method: str = "flora",
        num_rounds: int = 3,
        site_configs: dict | None = None,
        method_options: dict | None = None,
        module_shapes: list | None = None,
        max_update_norm: float = DEFAULT_MAX_UPDATE_NORM,
        *args,
        **kwargs,
    ):
        """Args:
        method: "flora" (exact stacking; bounded with method_options rank/energy), "shared_a" (nested
            shared-A), "fedit", "zero_pad", "hlora" (NVFlare's fixed-rank SVD baseline) or "fedcdd".
        num_rounds: training rounds; a final "validate" task evaluates the last global model.
        site_configs: {site: {"rank": r, "alpha": a, "target_modules": [...]}} as the job declared
            them; a site's result is vetted against its declared rank and modules and weighted by
            its declared alpha.
        method_options: the method's typed options, e.g. {"variant": "consensus"} for fedcdd, {"rank": 32}
            for flora (bounded global) and hlora (global rank).
        module_shapes: [[PEFT module prefix, out, in], ...]: every module the job's sites may adapt,
            from the base model (module_shapes.py); None: a site's modules must be its
            target_modules, with the shapes first accepted in the job.
        max_update_norm: X, the largest ||s*B@A||_F of one module of a site's update and of the
            round's aggregate; ||A||_F and ||s*B||_F up to √X (0: no bound).
        args, kwargs: those of FederatedWorkflow (min_clients, clients_per_round, seed, task_timeout,
            max_result_bytes, checkpoint_dir, he, ...); named so, FLARE's job export reads them too.
        """
        super().__init__(*args, **kwargs)
        if method not in METHODS:  # "full" is one-shot only: its updates are not LoRA factors
            raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
        check_method(method, method_options, module_shapes, self.he)
        check_limits(self.max_examples, max_update_norm)
        keep_args(self, locals())
        self.site_configs = site_configs or {}
        self.limits = UpdateLimits(pinned_shapes(module_shapes), self.max_examples, max_update_norm)

    def new_log(self) -> dict:
        log = {"method": self.method, "num_rounds": self.num_rounds}
        return {**log, "method_options": dict(self.method_options)} if self.method_options else log

    def make_aggregator(self, ckks):
        self.strategy = get_method(self.method, **(self.method_options or {}))
        if self.strategy.shared_a:  # the seeds' key: this job's id, unless a checkpoint's rounds used another
            self.strategy.bind(self.fl_ctx.get_job_id(), self.limits.module_shapes)
        return EncryptedRounds(self.strategy, ckks) if ckks else PlainRounds(self.strategy)

    def identity(self) -> dict:
        return {"method": self.method, "method_options": self.method_options, "site_configs": self.site_configs,
                "base_model": self.base_model}

    def workflow(self) -> None:
        self.rounds: list = []  # one aggregated global per round
        self.merged: dict[str, int] = {}  # rounds each site has installed, as it last reported
        self.learned: dict[str, tuple[int, int]] = {}  # shapes accepted so far (when not pinned)
        checkpoint, saved = self.open_checkpoint()
        if saved:
            self.rounds = saved.rounds
            for state in self.rounds:
                self.learned.update(lora_module_shapes(state))
            if saved.extra.get("scaling") is not None:
                self.strategy.scaling = saved.extra["scaling"]
            if saved.extra.get("shared_a_key"):
                self.strategy.key = saved.extra["shared_a_key"]
            self.strategy.commit(self.rounds)
        for rnd in range(len(self.rounds), self.num_rounds):
            sites = self.sample(rnd)
            results, record = self.run_task("train", sites, rnd)
            updates: list[SiteUpdate] = []
            for site in sorted(results):
                update = self.vet(rnd, site, record["sites"][site],
                                  lambda: self.vet_update(site, results[site], updates, rnd))
                if update is not None:
                    updates.append(update)
            self.require(rnd, [u.site for u in updates], sites)
            state, updates = self.aggregate(rnd, updates, record)
            self.rounds.append(state)
            record["aggregated"] = [u.site for u in updates]
            bounded = self.strategy.commit(self.rounds)
            if bounded:
                record["bounded"] = bounded
                self.info(f"round {rnd}: bounded global at rank {bounded['rank']}, truncation error "
                          f"{bounded['relative']:.3g} of its norm (worst module {bounded['max_relative']:.3g})")
            self.log["rounds"].append(record)
            self.info(f"round {rnd}: aggregated {len(updates)} site(s) with {self.method}")
            self.save_checkpoint(checkpoint, self.rounds, {"scaling": getattr(self.strategy, "scaling", None),
                                                           "shared_a_key": getattr(self.strategy, "key", None)})
            self.write_results()
        results, record = self.run_task("validate", self.live_clients(self.num_rounds), self.num_rounds)
        self.log["final"] = record
        digests = {s: e["base_digest"] for s, e in record["sites"].items() if isinstance(e.get("base_digest"), str)}
        if isinstance(self.strategy, FLoRA) and len(set(digests.values())) > 1:
            self.error(f"sites hold different base weights after catch-up: {digests}")
        self.write_results(final=True)

    def run_task(self, task: str, sites: list[str], rnd: int) -> tuple[dict[str, FLModel], dict]:
        """Send each site the state it lacks, wait for all, return {site: result} and a log record."""
        results: dict[str, FLModel] = {}
        record = {"round": rnd, "task": task, "sites": {s: {} for s in sites}}
        by_lag: dict[int, list[str]] = {}
        for site in sites:
            by_lag.setdefault(self.merged.get(site, 0), []).append(site)

        def on_result(result: FLModel) -> bool:
            site, entry = self.receive(result, record, RESULT_META)
            merged = entry.get("merged_rounds")
            if isinstance(merged, int) and not isinstance(merged, bool) and 0 <= merged <= len(self.rounds):
                self.merged[site] = merged
            results[site] = result
            return True

        final = task == "validate"
        spec = {"writer": "adapter", "base_model": self.base_model}
        for merged, group in sorted(by_lag.items()):
            meta = {"method": self.method, "round": rnd, "num_rounds": self.num_rounds, **self.layout_meta(group)}
            if self.strategy.shared_a:
                meta[SharedA.TASK_KEY] = self.strategy.key
            plan = self.aggregator.plan([self.site_configs.get(s, {}).get("rank", 0) for s in sites],
                                        spec if final else None)
            if plan is not None:
                meta["he"] = plan
            data = FLModel(params=self.aggregator.payload(self.rounds, merged, final), params_type=ParamsType.FULL,
                           current_round=rnd, total_rounds=self.num_rounds, meta=meta)
            self.send(task, data, group, record, on_result)
        self.wait_tasks()
        for site in sites:
            if site not in results:
                self.warning(f"round {rnd}: no {task} result from {site}")
                record["sites"][site]["missing"] = True
                # its state is unknown (it may have restarted from the base model): next time it is
                # sent the whole history, from which it installs only the rounds it lacks
                self.merged.pop(site, None)
        return results, record

    def layout_meta(self, sites: list[str]) -> dict:
        """What a task tells the sites' client-DP filters about the result it expects: the pinned
        modules and each site's declared rank and alpha (the server's word, not the job code's)."""
        return task_layout(self.limits.module_shapes, self.site_configs, sites)

    def vet_update(self, site: str, result: FLModel, accepted: list[SiteUpdate], rnd: int) -> SiteUpdate:
        """The site's result of round ``rnd`` as a SiteUpdate, checked in clear (HE: on its declared
        shapes) against its declared rank/alpha, the shapes seen so far and the method's own rules
        (shared-A: its B's with the A the server draws itself)."""
        meta = result.meta or {}
        declared = self.site_configs.get(site, {})
        merged = meta.get("merged_rounds")
        if not isinstance(merged, int) or isinstance(merged, bool) or not 0 <= merged <= len(self.rounds):
            raise InvalidUpdate(f"merged_rounds: expected an int in [0, {len(self.rounds)}], got {merged!r}")
        rank = declared.get("rank", meta.get("rank"))
        checked, state = self.aggregator.vet(result.params, rank, site, accepted)
        if self.strategy.shared_a:
            checked = self.strategy.expand(checked, rnd, rank)
            state = state if self.aggregator.encrypted else checked
        update = SiteUpdate(site=site, state=checked, num_examples=meta.get("num_examples", 0), rank=rank,
                            alpha=declared.get("alpha", meta.get("alpha", 0.0)))
        check_update(update, self.limits, learned=self.learned, targets=declared.get("target_modules"))
        self.strategy.check(update, accepted)
        self.learned.update(lora_module_shapes(update.state))
        update.state = state
        return update

    def aggregate(self, rnd: int, updates: list[SiteUpdate], record: dict) -> tuple[dict, list[SiteUpdate]]:
        """The round's global and the updates in it. An aggregate that raises, is not finite or exceeds
        max_update_norm is never stored or sent: the one site without which it would be fine is
        rejected and the rest re-aggregated (a safety net: the per-update factor caps already keep
        FedIT's, zero-pad's and FLoRA's aggregates within the bound); the job fails when no single
        site explains it, or fewer than min_clients remain."""
        state, problem = self._try_aggregate(updates)
        if problem is None:
            return state, updates
        culprits = [u for u in updates if self._try_aggregate([v for v in updates if v is not u])[1] is None]
        if len(culprits) != 1:  # none, or several each of which could be the cause: reject no one
            raise JobFailed(f"round {rnd}: the aggregate of {[u.site for u in updates]} {problem}")
        for update in culprits:
            entry = record["sites"][update.site]
            entry["rejected"] = f"the round's aggregate with this update {problem}; without it, within limits"
            self.error(f"round {rnd}: rejected update from {update.site}: {entry['rejected']}")
        updates = [u for u in updates if u not in culprits]
        self.require(rnd, [u.site for u in updates], [u.site for u in updates + culprits])
        state, problem = self._try_aggregate(updates)
        if problem is not None:
            raise JobFailed(f"round {rnd}: the aggregate of {[u.site for u in updates]} {problem}")
        return state, updates

    def _try_aggregate(self, updates: list[SiteUpdate]) -> tuple[dict | None, str | None]:
        """(the aggregate, None) or (None, what is wrong with it)."""
        try:
            state = self.aggregator.aggregate(updates)
        except Exception as e:  # noqa: BLE001 - vetted updates that still do not combine
            return None, f"cannot be computed ({type(e).__name__}: {e})"
        if self.aggregator.encrypted:
            return state, None
        bad = next((k for k, v in state.items() if not bool(v.isfinite().all())), None)
        if bad is not None:
            return None, f"is not finite at {bad}"
        if self.limits.max_update_norm:
            try:
                check_update_norms(state, getattr(self.strategy, "scaling", 1.0), self.limits.max_update_norm)
            except InvalidUpdate as e:
                return None, f"exceeds a bound: {e}"
        return state, None

    def write_results(self, final: bool = False) -> None:
        self.log.update(self.aggregator.save(self.out, self.rounds, final,
                                             {"writer": "adapter", "base_model": self.base_model}))
        self.write_json("metrics.json", self.log)
