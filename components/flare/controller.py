"""Server workflow for federated LoRA: rounds, per-site catch-up, update vetting, aggregation.

Thin FLARE glue around ``flare_lora.components.methods``: it decides who trains, ships each site exactly the
global state it lacks, rejects malformed updates (logged, round goes on), aggregates with the
method's pure-torch code, and writes results (metrics JSON, final PEFT adapter) into the run dir.
"""

from __future__ import annotations

import json
import os
import random
import time

import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.app_common.workflows.model_controller import ModelController
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.fuel.utils import fobs

from flare_lora.components.adapter_export import save_adapter
from flare_lora.components.algorithms.lora_state import InvalidUpdate, lora_module_shapes
from flare_lora.components.flare.checkpoint import CheckpointError, RoundCheckpoint
from flare_lora.components.methods import METHODS, SiteUpdate, check_update, get_method
from flare_lora.privacy.he_aggregate import check_he_method
from flare_lora.privacy.he_context import SERVER_CONTEXT, HEContextError
from flare_lora.privacy.he_server import LoraHE, open_server_context

RESULTS_DIRNAME = "flare_lora"


class LoraController(ModelController):
    def __init__(
        self,
        method: str = "flora",
        num_rounds: int = 3,
        min_clients: int = 1,
        clients_per_round: int | None = None,
        site_configs: dict | None = None,
        base_model: str = "",
        seed: int = 0,
        task_timeout: int = 0,
        wait_for_clients_timeout: float = 300.0,
        server_threads: int | None = 1,
        method_options: dict | None = None,
        checkpoint_dir: str = "",
        max_result_bytes: int = 0,
        he: bool = False,
        he_context: str = SERVER_CONTEXT,
    ):
        """Args:
        method: "flora" (exact stacking), "fedit" or "zero_pad".
        num_rounds: training rounds; a final "validate" round evaluates the last global model.
        min_clients: fewest valid updates a round needs; fewer fails the job with a clear error.
        clients_per_round: sites sampled per round (None: all connected) — partial participation.
        site_configs: {site: {"rank": r, "alpha": a, ...}} from the job; an update whose factors
            disagree with its site's declared rank is rejected.
        base_model: recorded in the exported adapter's config (base_model_name_or_path).
        server_threads: torch threads for aggregation. Stacking and averaging are memory-bound
            copies that one thread saturates; more threads only add a parallel-region barrier per
            tensor, which stalls badly when cores are shared (docs/benchmarks.md). None: leave as is.
        method_options: keyword options of the method's strategy, e.g. {"variant": "consensus"}
            for fedcdd (``get_method(method, **method_options)``).
        checkpoint_dir: if set, the global state is saved there after every round (relative paths
            are under the server's workspace), and a job started on a checkpoint of the same job
            continues after its last completed round (components/flare/checkpoint.py).
        max_result_bytes: if > 0, a site result larger than this on the wire is rejected (logged
            with the site's name, the round goes on without it).
        he: aggregate ciphertexts (privacy/he_server.py, docs/he.md): sites encrypt, this server
            combines with public weights and holds no secret key; its copy of the global stays
            encrypted and the sites write the final plaintext adapter. Context missing or holding
            the secret key: the job fails before any training.
        he_context: the server's context: a file in its startup kit (HEBuilder's
            server_context.tenseal) or an absolute path (simulator contexts, test-only).
        """
        super().__init__(persistor_id="", ignore_result_error=True)
        if method not in METHODS:  # "full" is one-shot only: its updates are not LoRA factors
            raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
        get_method(method, **(method_options or {}))  # fail at config time on an unknown option
        self.method = method  # FLARE's job export reads constructor args back from same-named attributes
        self.num_rounds = num_rounds
        self.min_clients = min_clients
        self.clients_per_round = clients_per_round
        self.site_configs = site_configs or {}
        self.base_model = base_model
        self.seed = seed
        self.task_timeout = task_timeout
        self.wait_for_clients_timeout = wait_for_clients_timeout
        self.server_threads = server_threads
        self.method_options = method_options
        self.checkpoint_dir = checkpoint_dir
        self.max_result_bytes = max_result_bytes
        self.he = he
        self.he_context = he_context
        if he:
            check_he_method(method)
            if checkpoint_dir:
                raise ValueError("checkpoint_dir: checkpoints hold plaintext rounds; not available with he")

    def run(self) -> None:
        fobs.register(TensorDecomposer)
        if self.server_threads:
            torch.set_num_threads(self.server_threads)
        self.strategy = get_method(self.method, **(self.method_options or {}))
        self.rounds: list[dict] = []  # one aggregated global state per round
        self.merged: dict[str, int] = {}  # rounds each site has installed, as it last reported
        self.module_shapes: dict[str, tuple[int, int]] = {}
        self.log = {"method": self.method, "num_rounds": self.num_rounds, "rounds": [], "final": {}}
        if self.method_options:
            self.log["method_options"] = dict(self.method_options)
        rng = random.Random(self.seed)
        self.down: set[str] = set()  # sites FLARE declared dead in this job
        self.he_rounds, self.he_pad_rank = None, None  # HE: the server half, the round's padding rank
        if self.he:
            try:
                self.he_rounds = LoraHE(open_server_context(self.he_context, self.fl_ctx), self.method)
            except HEContextError as e:
                self._fail(f"HE: {e}")
                return
            self.log["he"] = self.he_rounds.describe()
        try:
            checkpoint = self._resume(rng)
        except CheckpointError as e:
            self._fail(str(e))
            return

        for rnd in range(len(self.rounds), self.num_rounds):
            sites = self._sample(rnd, rng)
            if sites is None:
                return
            results, record = self._run_task("train", sites, rnd)
            updates = [u for u in (self._vet(rnd, s, results[s], record) for s in sorted(results)) if u]
            if len(updates) < self.min_clients:
                self._fail(
                    f"round {rnd}: {len(updates)} valid update(s) from {[u.site for u in updates]}, "
                    f"min_clients={self.min_clients}; rejected or missing: "
                    f"{sorted(set(sites) - {u.site for u in updates})}"
                )
                return
            self.rounds.append((self.he_rounds or self.strategy).aggregate(updates))
            record["aggregated"] = [u.site for u in updates]
            self.log["rounds"].append(record)
            self.info(f"round {rnd}: aggregated {len(updates)} site(s) with {self.method}")
            if checkpoint:
                checkpoint.save(self._identity(), self.rounds, self.log["rounds"], self._checkpoint_extra(rng))
            self._write_results()

        results, record = self._run_task("validate", self._live_clients(self.num_rounds), self.num_rounds)
        self.log["final"] = record
        digests = {s: r.meta.get("base_digest") for s, r in results.items() if r.meta.get("base_digest")}
        if self.method == "flora" and len(set(digests.values())) > 1:
            self.error(f"sites hold different base weights after catch-up: {digests}")
        self._write_results(final=True)

    def _identity(self) -> dict:
        """What a checkpoint must share with this job to be resumed by it."""
        return {"method": self.method, "method_options": self.method_options, "site_configs": self.site_configs,
                "base_model": self.base_model}

    def _checkpoint_extra(self, rng: random.Random) -> dict:
        version, internal, gauss = rng.getstate()
        return {"rng": [version, list(internal), gauss], "scaling": getattr(self.strategy, "scaling", None)}

    def _resume(self, rng: random.Random) -> RoundCheckpoint | None:
        """Open the checkpoint (if configured) and load the rounds it holds into this run."""
        if not self.checkpoint_dir:
            return None
        directory = os.path.join(self.engine.get_workspace().get_root_dir(), self.checkpoint_dir)
        checkpoint = RoundCheckpoint(directory)  # an absolute checkpoint_dir wins in os.path.join
        if not checkpoint.exists():
            self.info(f"checkpoint {directory}: none yet, starting at round 0")
            return checkpoint
        saved = checkpoint.load(self._identity())  # CheckpointError names the mismatching key
        self.rounds = saved.rounds
        self.log["rounds"] = saved.records
        self.log["resumed"] = {"from_round": len(saved.rounds), "checkpoint": directory}
        for state in self.rounds:
            self.module_shapes.update(lora_module_shapes(state))
        version, internal, gauss = saved.extra["rng"]
        rng.setstate((version, tuple(internal), gauss))
        if saved.extra.get("scaling") is not None:
            self.strategy.scaling = saved.extra["scaling"]
        self.info(f"checkpoint {directory}: resuming after {len(self.rounds)} completed round(s)")
        return checkpoint

    def _live_clients(self, rnd: int) -> list[str]:
        """The job's sites, less those FLARE declared dead: a task sent there would never run."""
        clients = sorted(c.name for c in self.engine.get_clients())
        down = {c for c in clients if self.communicator.get_client_disconnect_time(c)}
        if down - self.down:
            self.warning(f"round {rnd}: skipping site(s) FLARE declared disconnected: {sorted(down - self.down)}")
        self.down |= down
        return [c for c in clients if c not in down]

    def _sample(self, rnd: int, rng: random.Random) -> list[str] | None:
        deadline = time.time() + self.wait_for_clients_timeout
        while True:
            clients = self._live_clients(rnd)
            if len(clients) >= self.min_clients:
                break
            if time.time() > deadline or self.abort_signal.triggered:
                self._fail(
                    f"round {rnd}: only {len(clients)} site(s) connected {clients}, "
                    f"min_clients={self.min_clients} (waited {self.wait_for_clients_timeout:.0f}s)"
                )
                return None
            time.sleep(1.0)
        k = self.clients_per_round
        return clients if not k or k >= len(clients) else sorted(rng.sample(clients, max(k, self.min_clients)))

    def _run_task(self, task: str, sites: list[str], rnd: int) -> tuple[dict[str, FLModel], dict]:
        """Send each site the state it lacks, wait for all, return {site: result} and a log record."""
        results: dict[str, FLModel] = {}
        record = {"round": rnd, "task": task, "sites": {s: {} for s in sites}}
        by_lag: dict[int, list[str]] = {}
        for site in sites:
            by_lag.setdefault(self.merged.get(site, 0), []).append(site)

        def on_result(result: FLModel) -> bool:
            site = result.meta.get("client_name", "?")
            entry = record["sites"].setdefault(site, {})
            entry["upload_bytes"] = wire_bytes(result)
            if self.max_result_bytes and entry["upload_bytes"] > self.max_result_bytes:
                result.params = None  # rejected in _vet; do not hold an oversized payload until then
            entry["metrics"] = dict(result.metrics or {})
            for key in ("num_examples", "rank", "alpha", "merged_rounds", "base_digest", "train"):
                if key in result.meta:
                    entry[key] = result.meta[key]
            if isinstance(result.meta.get("merged_rounds"), int):
                self.merged[site] = result.meta["merged_rounds"]
            results[site] = result
            return True

        for merged, group in sorted(by_lag.items()):
            data = FLModel(
                params={} if self.he_rounds else self.strategy.payload(self.rounds, merged),  # HE: _he_task
                params_type=ParamsType.FULL,
                current_round=rnd,
                total_rounds=self.num_rounds,
                meta={"method": self.method, "round": rnd, "num_rounds": self.num_rounds},
            )
            if self.he_rounds:
                self._he_task(data, task, merged, sites)
            nbytes = wire_bytes(data)
            for site in group:
                record["sites"][site]["download_bytes"] = nbytes
            self.send_model(task_name=task, data=data, targets=group, timeout=self.task_timeout, callback=on_result)
        while self.get_num_standing_tasks():
            if self.abort_signal.triggered:
                break
            time.sleep(self._task_check_period)
        for site in sites:
            if site not in results:
                self.warning(f"round {rnd}: no {task} result from {site}")
                record["sites"][site]["missing"] = True
                # its state is unknown (it may have restarted from the base model): next time it is
                # sent the whole history, from which it installs only the rounds it lacks
                self.merged.pop(site, None)
        return results, record

    def _he_task(self, data: FLModel, task: str, merged: int, sites: list[str]) -> None:
        """HE: ciphertexts of the global the sites lack (the final task: all of it, so that they can
        write the final adapter) and the plan telling them how to pack their updates."""
        final = task == "validate"
        data.params = self.he_rounds.payload(self.rounds, 0 if final else merged)
        spec = {"writer": "adapter", "scaling": self.he_rounds.scaling, "base_model": self.base_model}
        data.meta["he"] = self.he_rounds.plan([self.site_configs.get(s, {}).get("rank", 0) for s in sites],
                                              spec if final else None)
        self.he_pad_rank = data.meta["he"]["pad_rank"]

    def _vet(self, rnd: int, site: str, result: FLModel, record: dict) -> SiteUpdate | None:
        """Turn a result into a SiteUpdate, or log why it is rejected (the round goes on)."""
        meta = result.meta or {}
        declared = self.site_configs.get(site, {})
        nbytes = record["sites"][site].get("upload_bytes", 0)
        if self.max_result_bytes and nbytes > self.max_result_bytes:
            reason = f"result of {nbytes} bytes exceeds max_result_bytes={self.max_result_bytes}"
            self.error(f"round {rnd}: rejected update from {site}: {reason}")
            record["sites"][site]["rejected"] = reason
            return None
        encrypted = None
        try:
            state, rank = dict(result.params or {}), declared.get("rank", meta.get("rank"))
            if self.he_rounds:  # only the layout can be vetted: its shapes go through the same checks
                encrypted, state = self.he_rounds.vet(result.params, rank, self.he_pad_rank, site)
            update = SiteUpdate(
                site=site,
                state=state,
                num_examples=meta.get("num_examples", 0),
                rank=rank,
                alpha=float(declared.get("alpha", meta.get("alpha", 0.0))),
            )
            check_update(update, self.module_shapes)
        except (InvalidUpdate, TypeError, ValueError) as e:
            self.error(f"round {rnd}: rejected update from {site}: {e}")
            record["sites"][site]["rejected"] = str(e)
            return None
        self.module_shapes.update(lora_module_shapes(update.state))
        if encrypted is not None:
            update.state = encrypted
        return update

    def _fail(self, reason: str) -> None:
        self.log["error"] = reason
        self._write_results()
        self.panic(reason)

    def _write_results(self, final: bool = False) -> None:
        out = os.path.join(self.get_run_dir(), RESULTS_DIRNAME)
        os.makedirs(out, exist_ok=True)
        if self.he_rounds:  # the server's copy of the global stays ciphertext; the sites write the adapter
            self.log["he"]["persisted"] = self.he_rounds.persist(out, self.rounds)
            if final:
                self.log["model_at_sites"] = f"{RESULTS_DIRNAME}/adapter in each site's run directory"
        elif final and self.rounds:
            state, scaling = self.strategy.final(self.rounds)
            save_adapter(os.path.join(out, "adapter"), state, scaling, self.base_model)
            self.log["adapter"] = "adapter"
        tmp = os.path.join(out, "metrics.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.log, f, indent=1, default=str)
        os.replace(tmp, os.path.join(out, "metrics.json"))


def wire_bytes(model: FLModel) -> int:
    """Bytes of the message as FLARE's serializer (fobs, tensors via safetensors) encodes it."""
    return len(fobs.dumps(FLModelUtils.to_shareable(model)))
