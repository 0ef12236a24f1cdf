"""FLARE filter: client-level Gaussian DP on a site's update before it leaves the site.

Runs in the site's FLARE client on the outgoing result, wired either by the job
(``LoraRecipe(client_dp={...})`` / ``--client-dp-clip --client-dp-sigma``) or by the site's admin in
``local/privacy.json`` (a scope's ``task_result_filters`` and ``task_data_filters``; docs/dp.md,
privacy/examples/privacy.json). The math is privacy/client_dp.py: reference + clip(update −
reference, C) + N(0, σ²C²), where the reference is the state local training started from:
- a WEIGHTS result of a flare-lora job: the file its ``update_reference`` meta entry points to
  (privacy/update_reference.py);
- a WEIGHTS result of any other job (plain FedAvg): the global weights the site received in the
  same task, kept by this class running as a task *data* filter (the IN direction);
- a WEIGHT_DIFF result: zero (it already is the change).

Fails closed: a weights result it cannot privatise (no reference, a DXO kind it does not know, a
spent budget) raises, so FLARE answers TASK_RESULT_FILTER_ERROR and nothing is sent. Metrics-only
results (validation, layer scores) pass unchanged: their content is not covered (docs/dp.md).
Each release is charged before it is sent to a ledger in the site workspace
(``flare_lora_privacy/client_dp.json``), so ε accumulates across rounds, jobs and restarts.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import FilterKey, FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

from flare_lora.privacy.client_dp import check_client_dp, privatize, release, update_norm
from flare_lora.privacy.ledger import PrivacyLedger, epsilon, site_ledger
from flare_lora.privacy.released_stats import released_train_stats
from flare_lora.privacy.update_reference import META_KEY, load_reference

LEDGER_NAME = "client_dp.jsonl"
KEEP_RECEIVED = 4  # globals kept at once; a site's job normally runs one task at a time

# (job id, task id) -> the global weights received in that task. Module level: privacy.json builds
# the data filter and the result filter as two instances in the same job process.
_received: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
_received_lock = threading.Lock()


def _task_key(fl_ctx: FLContext) -> tuple:
    return fl_ctx.get_job_id(), fl_ctx.get_prop(FLContextKey.TASK_ID)


def _as_tensor(value) -> torch.Tensor | None:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    return value if isinstance(value, torch.Tensor) else None


def _keep_received(shareable: Shareable, fl_ctx: FLContext) -> None:
    """Copy the tensors of an incoming WEIGHTS task (a copy: the trainer may change them in place)."""
    key = _task_key(fl_ctx)
    try:
        dxo = from_shareable(shareable)
    except ValueError:  # not a DXO: nothing to keep; a WEIGHTS result of this task then fails closed
        return
    if key[1] is None or dxo.data_kind != DataKind.WEIGHTS or not dxo.data:
        return
    tensors = {k: _as_tensor(v) for k, v in dxo.data.items()}
    state = {k: t.detach().to("cpu", copy=True) for k, t in tensors.items() if t is not None}
    with _received_lock:
        _received[key] = state
        while len(_received) > KEEP_RECEIVED:
            _received.popitem(last=False)


def _received_reference(tensors: dict, dxo: DXO, fl_ctx: FLContext) -> dict[str, torch.Tensor]:
    """The global this task received (kept by the data filter); ValueError naming what is missing."""
    site, (job, task) = fl_ctx.get_identity_name(), _task_key(fl_ctx)
    if "client_dp" in dxo.meta:
        raise ValueError(f"client DP at {site!r}: another ClientDPFilter (the job's or the scope's) already "
                         "released this result and used up its reference; keep only one; not sending it")
    with _received_lock:
        received = _received.get((job, task))
    if received is None:
        raise ValueError(
            f"client DP at {site!r}: a WEIGHTS result without {META_KEY!r} is privatised against the global "
            f"weights the site received in the same task, and none were kept for task {task} of job {job}: "
            "add ClientDPFilter to the scope's task_data_filters (local/privacy.json) as well as its "
            "task_result_filters; not sending the update")
    missing = sorted(k for k in tensors if k not in received)
    if missing:
        raise ValueError(f"client DP at {site!r}: result entries {missing[:3]} ({len(missing)} in all) were not "
                         "in the global weights the site received, so their change is unknown; not sending it")
    return received


class ClientDPFilter(DXOFilter):
    def __init__(self, clip: float, sigma: float, delta: float = 1e-5, epsilon_max: float | None = None,
                 accountant: str = "rdp", seed: int | None = None):
        """Args:
        clip: C, the L2 norm the site's change is clipped to (in parameter units).
        sigma: noise multiplier σ: each entry gets N(0, (σC)²).
        delta: δ at which ε is reported.
        epsilon_max: the site's budget; a release that would pass it is refused (nothing is sent).
        accountant: "rdp" or "prv" (Opacus).
        seed: fixed noise seed, for tests only (None: OS entropy). The job recipes refuse it; in a
            site's privacy.json it would make every job's noise reproducible by whoever knows it.
        """
        super().__init__(supported_data_kinds=None, data_kinds_to_filter=None)
        check_client_dp(clip, sigma, delta, epsilon_max)
        if accountant not in ("rdp", "prv"):
            raise ValueError(f"client DP accountant: expected 'rdp' or 'prv', got {accountant!r}")
        # FLARE's job export reads constructor args back from same-named attributes
        self.clip = clip
        self.sigma = sigma
        self.delta = delta
        self.epsilon_max = epsilon_max
        self.accountant = accountant
        self.seed = seed
        self._ledgers: dict[str | None, PrivacyLedger] = {}
        self._calls = 0

    def _ledger(self, fl_ctx: FLContext) -> PrivacyLedger:
        engine = fl_ctx.get_engine()
        root = engine.get_workspace().get_root_dir() if engine is not None else None
        if root not in self._ledgers:
            self._ledgers[root] = site_ledger(root, LEDGER_NAME)
        return self._ledgers[root]

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """As a task data filter: keep the received global; as a result filter: privatise, then drop it."""
        if fl_ctx.get_prop(FLContextKey.FILTER_DIRECTION) == FilterKey.IN:
            _keep_received(shareable, fl_ctx)
            return shareable
        try:
            return super().process(shareable, fl_ctx)
        finally:
            with _received_lock:
                _received.pop(_task_key(fl_ctx), None)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if dxo.data_kind == DataKind.METRICS:
            return None
        site = fl_ctx.get_identity_name()
        if dxo.data_kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
            raise ValueError(f"client DP at {site!r}: cannot privatise a {dxo.data_kind} result; not sending it")
        tensors, kinds = {}, {}
        for key, value in dxo.data.items():
            tensors[key], kinds[key] = _as_tensor(value), "numpy" if isinstance(value, np.ndarray) else "torch"
            if tensors[key] is None:
                raise ValueError(f"client DP at {site!r}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if dxo.data_kind == DataKind.WEIGHT_DIFF:  # already the change the site made
            reference = {k: torch.zeros_like(t, dtype=torch.float32) for k, t in tensors.items()}
        elif META_KEY in dxo.meta:  # a flare-lora script named where its training started
            reference = load_reference(dxo.meta)
        else:
            reference = _received_reference(tensors, dxo, fl_ctx)
        ledger = self._ledger(fl_ctx)

        def within(history) -> None:  # checked on the ledger as it is at the charge, under its lock
            after = epsilon(history, self.delta, self.accountant)
            if self.epsilon_max is not None and after > self.epsilon_max:
                raise RuntimeError(
                    f"client DP at {site!r}: this release would spend ε={after:.3f} > epsilon_max "
                    f"{self.epsilon_max:g} ({len(history) - 1} releases so far); refusing to send the update")

        rnd = shareable.get_header(AppConstants.CURRENT_ROUND)
        rnd = self._calls if rnd is None else int(rnd)
        self._calls += 1
        ledger.charge(*release(self.sigma), check=within, site=site, round=rnd, job=fl_ctx.get_job_id(), clip=self.clip)
        seed = secrets.randbits(63) if self.seed is None else int.from_bytes(
            hashlib.sha256(f"{self.seed}|{site}|{rnd}".encode()).digest()[:8], "big") >> 1
        generator = torch.Generator().manual_seed(seed)
        change = update_norm({k: tensors[k].float() - reference[k].float() for k in tensors})
        noisy = privatize(tensors, reference, self.clip, self.sigma, generator)
        for key, value in noisy.items():
            original = tensors[key]
            value = value.to(original.dtype) if original.is_floating_point() else value
            dxo.data[key] = value.numpy() if kinds[key] == "numpy" else value
        dxo.meta.pop(META_KEY, None)
        if isinstance(dxo.meta.get("train"), Mapping):  # a flare-lora result's training statistics
            dxo.meta["train"] = released_train_stats(dxo.meta["train"])
        spent = ledger.epsilon(self.delta, self.accountant)
        report = {"epsilon": spent, "delta": self.delta, "sigma": self.sigma, "clip": self.clip,
                  "releases": len(ledger.entries), "accountant": self.accountant, "epsilon_max": self.epsilon_max}
        dxo.meta["client_dp"] = report
        metrics = dxo.meta.get(MetaKey.INITIAL_METRICS)
        if isinstance(metrics, dict):
            metrics["client_dp_epsilon"] = spent
        self.log_info(fl_ctx, f"client DP: {site} round {rnd}: change of norm {change:.4g} clipped to {self.clip:g}, "
                              f"noise std {self.sigma * self.clip:g} on {len(tensors)} tensors; ε={spent:.4g} "
                              f"at δ={self.delta:g} after {len(ledger.entries)} release(s)")
        return dxo

