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
is charged to the site's ledger (``flare_lora_privacy/client_dp.jsonl``) once its noise is drawn
(on the update's device) and before it is sent, so a release that fails is not charged and ε
accumulates across rounds, jobs and restarts.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.app_common.app_constant import AppConstants

from flare_lora.privacy.client_dp import check_client_dp, privatize, release, update_norm
from flare_lora.components.algorithms.layer_average import layer_of
from flare_lora.components.algorithms.lora_init import init_seed
from flare_lora.components.optional import load
from flare_lora.privacy.dp_reference import (
    INIT_SEED_KEY,
    FRESH_METHODS,
    SLICING_METHODS,
    ReceivedView,
    derive_reference,
    expected_layout,
)
from flare_lora.privacy.ledger import PrivacyLedger, epsilon, site_ledger
from flare_lora.privacy.released_stats import FLARE_LORA_METRICS, released_meta, released_metrics

LEDGER_NAME = "client_dp.jsonl"
KEEP_TASKS = 16  # tasks remembered at once; a site's job normally runs one task at a time
MAX_LAYERS = 100_000

# Module level: privacy.json builds the data filter and the result filter as two instances in the
# same job process. _tasks: (job id, task id) -> what the task said and when it came; _jobs: job id ->
# what its tasks said so far; _pins: (job id, site) -> values pinned at the job's first result here.
_lock = threading.Lock()
_view = ReceivedView()
_tasks: OrderedDict[tuple, dict] = OrderedDict()
_jobs: OrderedDict[str, dict] = OrderedDict()
_pins: dict[tuple, dict] = {}
_reports: dict[tuple, dict] = {}  # (job id, task id) -> the release's accounting, until its meta is rebuilt


def _task_key(fl_ctx: FLContext) -> tuple:
    return fl_ctx.get_job_id(), fl_ctx.get_prop(FLContextKey.TASK_ID)


def _as_tensor(value) -> torch.Tensor | None:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    return value if isinstance(value, torch.Tensor) else None


def _count(value, high: int = 10**9) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high else None


def _round(shareable: Shareable, meta: dict) -> int:
    rnd = shareable.get_header(AppConstants.CURRENT_ROUND)
    return _count(meta.get("round", 0) if rnd is None else rnd) or 0


def _keep_task(shareable: Shareable, fl_ctx: FLContext) -> Shareable:
    """Record an incoming task's tensors and what it says, and hand the client the round's init seed."""
    job, task = _task_key(fl_ctx)
    try:
        dxo = from_shareable(shareable)
    except ValueError:  # not a DXO: nothing to keep; a WEIGHTS result of this task then fails closed
        return shareable
    if task is None or dxo.data_kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
        return shareable
    data, meta, site = dxo.data or {}, dxo.meta, fl_ctx.get_identity_name()
    tensors = {k: _as_tensor(v) for k, v in data.items() if isinstance(k, str)}
    plain = {k: t for k, t in tensors.items() if t is not None}
    method = meta.get("method")
    method = "selective" if method is None and "mode" in meta else method
    # FLoRA's and shared-A's rounds (r<t>/), or a bounded FLoRA global (g<t>/, which holds rounds up to t)
    rounds = [int(k[1:k.index("/")]) for k in plain if k[:1] in ("r", "g") and k[1:k.index("/") if "/" in k else 0].isdigit()]
    lora = (meta.get("lora") or {}).get(site) if isinstance(meta.get("lora"), dict) else None
    layers = meta.get("layers")
    info = {"method": method if isinstance(method, str) else None, "round": _round(shareable, meta),
            "encrypted": len(plain) < len(data), "numpy": any(isinstance(v, np.ndarray) for v in data.values()),
            "layers": sorted({l for l in layers if _count(l, MAX_LAYERS) is not None}) if isinstance(layers, list) else None,
            "lora": lora if isinstance(lora, list) and len(lora) == 2 else None, "since": time.monotonic(),
            "modules": _modules(meta.get("modules"))}
    info["seed"] = init_seed(job, info["round"])
    with _lock:
        _view.update(job, plain)
        state = _jobs.setdefault(job, {"flora_rounds": 0, "installs": 0, "versions": {}})
        _jobs.move_to_end(job)
        while len(_jobs) > KEEP_TASKS:
            _jobs.popitem(last=False)
        state["flora_rounds"] = max([state["flora_rounds"], *(r + 1 for r in rounds)])
        state["installs"] += 1 if plain and not rounds else 0
        versions = meta.get("layer_versions")
        for layer, version in (versions.items() if isinstance(versions, dict) else ()):
            if isinstance(layer, str) and layer.isdigit() and _count(version) is not None:
                state["versions"][layer] = version
        _tasks[(job, task)] = info
        while len(_tasks) > KEEP_TASKS:
            _tasks.popitem(last=False)
    dxo.meta[INIT_SEED_KEY] = info["seed"]
    return dxo.update_shareable(shareable)


def _modules(value) -> list | None:
    """The task's [[prefix, out, in], ...] (the server's pinned LoRA modules), or None."""
    if not isinstance(value, list) or not all(isinstance(m, list) and len(m) == 3 and isinstance(m[0], str)
                                              and _count(m[1]) and _count(m[2]) for m in value):
        return None
    return value


def _pinned(job: str, site: str, meta: dict, lora: list | None) -> dict:
    """The values this site's results in this job must keep: the first ones seen (rank/alpha from
    the server's task where it names them)."""
    with _lock:
        pins = _pins.setdefault((job, site), {})
        if lora is not None:
            pins.setdefault("rank", lora[0])
            pins.setdefault("alpha", lora[1])
        for key, high in (("rank", 4096), ("num_layers", MAX_LAYERS), ("budget", MAX_LAYERS),
                          ("budget_configured", MAX_LAYERS), ("budget_cap", MAX_LAYERS)):
            if _count(meta.get(key), high) is not None:
                pins.setdefault(key, meta[key])
        alpha = meta.get("alpha")
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 < alpha < 1e6:
            pins.setdefault("alpha", float(alpha))
        return dict(pins)


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
        load("opacus.accountants")  # its accountant: missing, the job (or the site's privacy.json) fails here, named
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
        """As a task data filter: keep what the task holds. As a result filter: privatise the weights
        and return a new message holding only what was rebuilt (entries, meta, metrics, the task's
        round): nothing else the job's process put into its result leaves (headers, other kinds)."""
        if fl_ctx.get_prop(FLContextKey.FILTER_DIRECTION) == FilterKey.IN:
            return _keep_task(shareable, fl_ctx)
        key, site = _task_key(fl_ctx), fl_ctx.get_identity_name()
        with _lock:
            info = _tasks.get(key)
        try:
            if shareable.get_return_code() != ReturnCode.OK:  # a failed task: its code, nothing else
                return make_reply(shareable.get_return_code())
            try:
                kind = from_shareable(shareable).data_kind
            except Exception:  # noqa: BLE001 - whatever the job sent, it is not a result this filter can check
                raise ValueError(f"client DP at {site!r}: the result is not a valid DXO; not sending it") from None
            if kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF, DataKind.METRICS):
                raise ValueError(f"client DP at {site!r}: cannot privatise a {kind} result; not sending it")
            dxo = from_shareable(super().process(shareable, fl_ctx))
        finally:
            with _lock:
                _tasks.pop(key, None)
                report = _reports.pop(key, None)
        job_state = _jobs.get(key[0], {})
        method = (info or {}).get("method")
        pins = _pinned(key[0], site, dxo.meta, (info or {}).get("lora"))
        facts = {**pins, "layers": (info or {}).get("layers"), "layer_versions": dict(job_state.get("versions", {})),
                 "merged_rounds": job_state.get("flora_rounds" if method in FRESH_METHODS else "installs"),
                 "seconds": round(time.monotonic() - info["since"], 1) if info else None}
        meta, dropped = released_meta(dxo.meta, facts, FLARE_LORA_METRICS if method else None)
        if report is not None:  # only this filter's own report, never one the job wrote
            meta["client_dp"] = report
        if dropped:
            self.log_info(fl_ctx, f"client DP: withheld result meta {dropped[:8]} (not on the allow-list)")
        data = released_metrics(dxo.data, FLARE_LORA_METRICS if method else None) \
            if dxo.data_kind == DataKind.METRICS else dxo.data
        out = DXO(dxo.data_kind, data=data, meta=meta).to_shareable()
        if info is not None:
            out.set_header(AppConstants.CURRENT_ROUND, info["round"])
        return out

    def _reference(self, tensors: dict, dxo: DXO, fl_ctx: FLContext) -> dict[str, torch.Tensor]:
        """Where the site's training started, from the task this filter kept (dp_reference.py)."""
        site, (job, task) = fl_ctx.get_identity_name(), _task_key(fl_ctx)
        if "client_dp" in dxo.meta:
            raise ValueError(f"client DP at {site!r}: another ClientDPFilter (the job's or the scope's) already "
                             "released this result and used up its reference; keep only one; not sending it")
        with _lock:
            info = _tasks.get((job, task))
            received = dict(_view.get(job))
        if info is None:
            raise ValueError(
                f"client DP at {site!r}: a WEIGHTS result is privatised against what the server sent in the same "
                f"task, and nothing was kept for task {task} of job {job}: add ClientDPFilter to the scope's "
                "task_data_filters (local/privacy.json) as well as its task_result_filters; not sending the update")
        method = info["method"]
        if info["encrypted"] and method not in FRESH_METHODS:  # their start is fresh whatever was sent
            raise ValueError(f"client DP at {site!r}: the global of task {task} arrived encrypted, so this filter "
                             "cannot tell where training started; with HE, enable client DP in the job "
                             "(--client-dp-*: it sees the decrypted global); not sending the update")
        pins = _pinned(job, site, dxo.meta, info["lora"])
        if (dxo.meta.get("rank"), dxo.meta.get("alpha")) != (pins.get("rank"), pins.get("alpha")) \
                and method in SLICING_METHODS:
            raise ValueError(f"client DP at {site!r}: rank/alpha {dxo.meta.get('rank')}/{dxo.meta.get('alpha')} "
                             f"differ from this job's ({pins.get('rank')}/{pins.get('alpha')}); not sending the update")
        rank, alpha = pins.get("rank"), pins.get("alpha")
        scaling = alpha / rank if isinstance(rank, int) and rank > 0 and isinstance(alpha, float) else None
        shapes = {k: tuple(t.shape) for k, t in tensors.items()}
        expected = expected_layout(method, received, info["modules"], rank)
        if expected is not None and shapes != expected:
            wrong = sorted(set(shapes) ^ set(expected)) or sorted(k for k in shapes if shapes[k] != expected[k])
            raise ValueError(f"client DP at {site!r}: the result's entries differ from what the task fixes "
                             f"({len(shapes)} vs {len(expected)}; e.g. {wrong[:2]}); not sending it")
        if method == "selective" and any(layer_of(k) not in (info["layers"] or []) for k in shapes):
            raise ValueError(f"client DP at {site!r}: the result holds layers the task did not assign "
                             f"({info['layers']}); not sending it")
        try:
            return derive_reference(shapes, received, method, info["seed"], scaling)
        except ValueError as e:
            raise ValueError(f"client DP at {site!r}: {e}; not sending the update") from None

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if dxo.data_kind == DataKind.METRICS:
            return None
        site = fl_ctx.get_identity_name()
        if dxo.data_kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
            raise ValueError(f"client DP at {site!r}: cannot privatise a {dxo.data_kind} result; not sending it")
        tensors = {}
        for key, value in dxo.data.items():
            tensor = _as_tensor(value)
            if not isinstance(key, str) or tensor is None or not tensor.is_floating_point():
                raise ValueError(f"client DP at {site!r}: entry {str(key)[:80]!r} is a {type(value).__name__}, "
                                 "not a floating-point tensor; not sending it")
            if not bool(tensor.isfinite().all()):  # clipping cannot bound NaN/inf: they would pass as they are
                raise ValueError(f"client DP at {site!r}: entry {key[:80]!r} is not finite; not sending it")
            tensors[key] = tensor
        with _lock:
            info = _tasks.get(_task_key(fl_ctx)) or {}
            received = _view.get(fl_ctx.get_job_id())
            diff_shapes = {k: tuple(v.shape) for k, v in received.items()}
        if dxo.data_kind == DataKind.WEIGHT_DIFF:  # already the change the site made: of what it was sent
            if {k: tuple(t.shape) for k, t in tensors.items()} != diff_shapes:
                raise ValueError(f"client DP at {site!r}: a WEIGHT_DIFF result must hold exactly the entries the "
                                 "server sent, with their shapes; not sending it")
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

        rnd = info.get("round", self._calls)  # the task's round, not what the result says
        self._calls += 1
        devices = {t.device for t in tensors.values()}
        if len(devices) > 1:
            raise ValueError(f"client DP at {site!r}: the result's tensors are on {sorted(map(str, devices))}, "
                             "expected one device; not sending it")
        seed = secrets.randbits(63) if self.seed is None else int.from_bytes(
            hashlib.sha256(f"{self.seed}|{site}|{rnd}".encode()).digest()[:8], "big") >> 1
        generator = torch.Generator(device=devices.pop() if devices else "cpu").manual_seed(seed)
        change = update_norm({k: tensors[k].float() - reference[k].to(tensors[k].device) for k in tensors})
        noisy = privatize(tensors, reference, self.clip, self.sigma, generator)
        # charged once the noisy release exists and before it leaves: a failure above charges nothing
        ledger.charge(*release(self.sigma), check=within, site=site, round=rnd, job=fl_ctx.get_job_id(), clip=self.clip)
        # rebuilt, not edited: sorted entries, float32, the reference's shapes
        dxo.data = {k: (noisy[k].numpy() if info.get("numpy") else noisy[k]) for k in sorted(noisy)}  # as the task came
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
