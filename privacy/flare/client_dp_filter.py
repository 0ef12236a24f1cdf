"""FLARE filter: client-level Gaussian DP on a site's update before it leaves the site.

Runs in the site's FLARE client, wired either by the job (``LoraRecipe(client_dp={...})`` /
``--client-dp-clip --client-dp-sigma``) or by the site's admin in ``local/privacy.json`` (a scope's
``task_data_filters`` and ``task_result_filters``; docs/dp.md, privacy/examples/privacy.json). It
must see both directions:
- tasks (IN): it keeps the tensors the server sent (per job, the latest value of each) and writes
  into the task the seed of the round's fresh adapters (privacy/dp_reference.py);
- results (OUT): it releases reference + clip(result − reference, C) + N(0, σ²C²)
  (privacy/client_dp.py), where the reference is derived from those two only: nothing the job's
  code writes or says can move it. A WEIGHT_DIFF result's reference is zero.

What leaves is rebuilt: entries in sorted order as float32, with the shapes the reference has; the
result's meta and metrics from an allow-list (privacy/released_stats.py), so neither digests nor
free text nor the record count pass. A job's rank and alpha are pinned at its first release here.

Fails closed: a weights result it cannot privatise (no reference, a DXO kind it does not know, a
spent budget) raises, so FLARE answers TASK_RESULT_FILTER_ERROR and nothing is sent. Each release
is charged before it is sent to the site's ledger (``flare_lora_privacy/client_dp.jsonl``), so ε
accumulates across rounds, jobs and restarts.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections import OrderedDict

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

from flare_lora.privacy.client_dp import check_client_dp, privatize, release, update_norm
from flare_lora.privacy.dp_reference import INIT_SEED_KEY, ReceivedView, derive_reference, init_seed
from flare_lora.privacy.ledger import PrivacyLedger, epsilon, site_ledger
from flare_lora.privacy.released_stats import released_meta, released_metrics

LEDGER_NAME = "client_dp.jsonl"
KEEP_TASKS = 16  # tasks remembered at once; a site's job normally runs one task at a time

# Module level: privacy.json builds the data filter and the result filter as two instances in the
# same job process. _tasks: (job id, task id) -> what the task said (method, round, seed, encrypted).
_lock = threading.Lock()
_view = ReceivedView()
_tasks: OrderedDict[tuple, dict] = OrderedDict()
_reports: dict[tuple, dict] = {}  # (job id, task id) -> the release's accounting, until its meta is rebuilt
_layouts: dict[tuple, dict] = {}  # (job id, site) -> rank and alpha of its first release


def _task_key(fl_ctx: FLContext) -> tuple:
    return fl_ctx.get_job_id(), fl_ctx.get_prop(FLContextKey.TASK_ID)


def _as_tensor(value) -> torch.Tensor | None:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    return value if isinstance(value, torch.Tensor) else None


def _round(shareable: Shareable, meta: dict) -> int:
    rnd = shareable.get_header(AppConstants.CURRENT_ROUND)
    rnd = meta.get("round", 0) if rnd is None else rnd
    return int(rnd) if isinstance(rnd, int) and not isinstance(rnd, bool) else 0


def _keep_task(shareable: Shareable, fl_ctx: FLContext) -> Shareable:
    """Record an incoming task's tensors and what it says, and hand the client the round's init seed."""
    job, task = _task_key(fl_ctx)
    try:
        dxo = from_shareable(shareable)
    except ValueError:  # not a DXO: nothing to keep; a WEIGHTS result of this task then fails closed
        return shareable
    if task is None or dxo.data_kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
        return shareable
    data = dxo.data or {}
    tensors = {k: _as_tensor(v) for k, v in data.items() if isinstance(k, str)}
    plain = {k: t for k, t in tensors.items() if t is not None}
    method = dxo.meta.get("method")
    method = "selective" if method is None and "mode" in dxo.meta else method
    info = {"method": method if isinstance(method, str) else None, "round": _round(shareable, dxo.meta),
            "encrypted": len(plain) < len(data)}
    info["seed"] = init_seed(job, info["round"])
    with _lock:
        _view.update(job, plain)
        _tasks[(job, task)] = info
        while len(_tasks) > KEEP_TASKS:
            _tasks.popitem(last=False)
    dxo.meta[INIT_SEED_KEY] = info["seed"]
    return dxo.update_shareable(shareable)


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
        """As a task data filter: keep what the task holds; as a result filter: privatise the weights,
        then rebuild every result's meta and metrics from the allow-list (metrics-only results too)."""
        if fl_ctx.get_prop(FLContextKey.FILTER_DIRECTION) == FilterKey.IN:
            return _keep_task(shareable, fl_ctx)
        try:
            shareable = super().process(shareable, fl_ctx)
        finally:
            with _lock:
                _tasks.pop(_task_key(fl_ctx), None)
        if shareable.get_return_code() != ReturnCode.OK:
            return shareable
        try:
            dxo = from_shareable(shareable)
        except ValueError:  # not a DXO: FLARE's own messages (no data of the job's)
            return shareable
        if dxo.data_kind == DataKind.METRICS:
            dxo.data = released_metrics(dxo.data)
        meta, dropped = released_meta(dxo.meta, keep=(MetaKey.FILTER_HISTORY,))
        with _lock:
            report = _reports.pop(_task_key(fl_ctx), None)
        if report is not None:  # only this filter's own report, never one the job wrote
            meta["client_dp"] = report
        if dropped:
            self.log_info(fl_ctx, f"client DP: withheld result meta {dropped[:8]} (not on the allow-list)")
        dxo.meta.clear()
        dxo.meta.update(meta)
        return dxo.update_shareable(shareable)

    def _reference(self, tensors: dict, dxo: DXO, fl_ctx: FLContext) -> dict[str, torch.Tensor]:
        """Where the site's training started, from the task this filter kept (dp_reference.py)."""
        site, (job, task) = fl_ctx.get_identity_name(), _task_key(fl_ctx)
        if "client_dp" in dxo.meta:
            raise ValueError(f"client DP at {site!r}: another ClientDPFilter (the job's or the scope's) already "
                             "released this result and used up its reference; keep only one; not sending it")
        with _lock:
            info = _tasks.get((job, task))
            received = dict(_view.get(job))
            layout = _layouts.setdefault((job, site), {"rank": dxo.meta.get("rank"), "alpha": dxo.meta.get("alpha")})
        if info is None:
            raise ValueError(
                f"client DP at {site!r}: a WEIGHTS result is privatised against what the server sent in the same "
                f"task, and nothing was kept for task {task} of job {job}: add ClientDPFilter to the scope's "
                "task_data_filters (local/privacy.json) as well as its task_result_filters; not sending the update")
        method = info["method"]
        if info["encrypted"] and method != "flora":
            raise ValueError(f"client DP at {site!r}: the global of task {task} arrived encrypted, so this filter "
                             "cannot tell where training started; with HE, enable client DP in the job "
                             "(--client-dp-*: it sees the decrypted global); not sending the update")
        if (dxo.meta.get("rank"), dxo.meta.get("alpha")) != (layout["rank"], layout["alpha"]):
            raise ValueError(f"client DP at {site!r}: rank/alpha {dxo.meta.get('rank')}/{dxo.meta.get('alpha')} "
                             f"differ from this job's first release here ({layout['rank']}/{layout['alpha']}); "
                             "not sending the update")
        rank, alpha = layout["rank"], layout["alpha"]
        scaling = alpha / rank if isinstance(rank, int) and rank > 0 and isinstance(alpha, (int, float)) else None
        try:
            return derive_reference({k: tuple(t.shape) for k, t in tensors.items()}, received, method,
                                    info["seed"], scaling)
        except ValueError as e:
            raise ValueError(f"client DP at {site!r}: {e}; not sending the update") from None

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if dxo.data_kind == DataKind.METRICS:
            return None
        site = fl_ctx.get_identity_name()
        if dxo.data_kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
            raise ValueError(f"client DP at {site!r}: cannot privatise a {dxo.data_kind} result; not sending it")
        tensors, as_numpy = {}, False
        for key, value in dxo.data.items():
            tensor = _as_tensor(value)
            if not isinstance(key, str) or tensor is None or not tensor.is_floating_point():
                raise ValueError(f"client DP at {site!r}: entry {str(key)[:80]!r} is a {type(value).__name__}, "
                                 "not a floating-point tensor; not sending it")
            tensors[key], as_numpy = tensor, as_numpy or isinstance(value, np.ndarray)
        if dxo.data_kind == DataKind.WEIGHT_DIFF:  # already the change the site made
            reference = {k: torch.zeros(t.shape) for k, t in tensors.items()}
        else:
            reference = self._reference(tensors, dxo, fl_ctx)
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
        change = update_norm({k: tensors[k].float() - reference[k] for k in tensors})
        noisy = privatize(tensors, reference, self.clip, self.sigma, generator)
        # rebuilt, not edited: sorted entries, float32, the reference's shapes
        dxo.data = {k: (noisy[k].numpy() if as_numpy else noisy[k]) for k in sorted(noisy)}
        spent = ledger.epsilon(self.delta, self.accountant)
        dxo.meta["client_dp"] = report = {"epsilon": spent, "delta": self.delta, "sigma": self.sigma, "clip": self.clip,
                                 "releases": len(ledger.entries), "accountant": self.accountant,
                                 "epsilon_max": self.epsilon_max}
        with _lock:
            _reports[_task_key(fl_ctx)] = report
        metrics = dxo.meta.get(MetaKey.INITIAL_METRICS)
        if isinstance(metrics, dict):
            metrics["client_dp_epsilon"] = spent
        self.log_info(fl_ctx, f"client DP: {site} round {rnd}: change of norm {change:.4g} clipped to {self.clip:g}, "
                              f"noise std {self.sigma * self.clip:g} on {len(tensors)} tensors; ε={spent:.4g} "
                              f"at δ={self.delta:g} after {len(ledger.entries)} release(s)")
        return dxo
