"""``FederatedWorkflow``: the server workflow core every flare-lora job specialises.

It owns what the LoRA-rounds, one-shot and selective-layer controllers share: the aggregator
(plaintext, or encrypted when ``he`` is on: the only place HE is decided), sampling among the
sites FLARE has not declared dead, sending tasks and waiting with a timeout, the result size cap,
vetting every site result so that any exception from one site's data rejects that result (logged,
the round goes on), failing the job with the reason when fewer than ``min_clients`` valid results
remain, atomic results writing, and checkpoint/resume. A job's controller supplies ``workflow()``
and, where it needs them, the checkpoint's identity and extra state.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Mapping

import torch
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.job_def import JobMetaKey
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.app_common.workflows.model_controller import ModelController
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.fuel.utils import fobs

from flare_lora.components.flare.checkpoint import CheckpointError, Resumed, RoundCheckpoint
from flare_lora.components.flare.nvflare_compat import task_check_period
from flare_lora.components.flare.tracking import TRAIN_KEYS, progress, server_scalars
from flare_lora.components.strategies.base import DEFAULT_MAX_EXAMPLES, check_limits
from flare_lora.privacy.he_context import SERVER_CONTEXT, HEContextError
from flare_lora.privacy.he_server import open_server_context

RESULTS_DIRNAME = "flare_lora"
CHECKPOINTS_DIRNAME = "flare_lora_checkpoints"  # in the server's workspace, one folder per submitter


class JobFailed(Exception):
    """The workflow cannot go on; the message is the reason the job fails with."""


class FederatedWorkflow(ModelController):
    def __init__(
        self,
        min_clients: int = 1,
        clients_per_round: int | None = None,
        seed: int = 0,
        task_timeout: int = 0,
        wait_for_clients_timeout: float = 300.0,
        server_threads: int | None = 1,
        base_model: str = "",
        max_result_bytes: int = 0,
        max_examples: int = DEFAULT_MAX_EXAMPLES,
        checkpoint_dir: str = "",
        he: bool = False,
        he_context: str = SERVER_CONTEXT,
    ):
        """Args shared by every job's controller:
        min_clients: fewest valid results a round needs; fewer fails the job with the reason.
        clients_per_round: sites sampled per round (None: every live site).
        seed: the sampling RNG's seed.
        task_timeout: seconds a task waits for a live site (0: until it answers or FLARE declares it dead).
        wait_for_clients_timeout: seconds to wait for min_clients sites to connect.
        server_threads: torch threads of the server (None: leave as is). Aggregation is memory-bound
            copies that one thread saturates; more only add barriers when cores are shared.
        base_model: the model path or id the sites load (recorded in the exported adapter).
        max_result_bytes: if > 0, a site result larger than this on the wire is rejected. FLARE 2.9
            has no receiver-side cap (comm_config's max_message_size is enforced by the sender),
            so the server has decoded the result when this is checked (docs/production.md).
        max_examples: a result declaring more examples (its weight in the aggregate) is rejected.
        checkpoint_dir: if set, the global state is saved after every round in
            ``<server workspace>/flare_lora_checkpoints/<submitter>/<checkpoint_dir>`` (a relative
            path without ".."): a job reaches only its own submitter's checkpoints, and one started
            on a checkpoint of the same job continues after its last completed round
            (checkpoint.py). Not with he.
        he: aggregate ciphertexts (privacy/he_server.py, docs/he.md): sites encrypt, this server
            combines with public weights and holds no secret key; its copy of the global stays
            encrypted and the sites write the final model.
        he_context: the server's context: a file in its startup kit (HEBuilder's
            server_context.tenseal) or an absolute path (simulator contexts, test-only).
        """
        super().__init__(persistor_id="", ignore_result_error=True)
        check_limits(max_examples, 0)
        if checkpoint_dir and not is_plain_relative(checkpoint_dir):
            raise ValueError(f"checkpoint_dir: expected a relative path without '..' (it lives under the server's "
                             f"workspace, in the submitter's folder), got {checkpoint_dir!r}")
        if he and checkpoint_dir:
            raise ValueError("checkpoint_dir: checkpoints hold plaintext rounds; not available with he")
        keep_args(self, locals())

    # --- what a job supplies -------------------------------------------------------------

    def new_log(self) -> dict:
        """The results log's first entries (method, options)."""
        raise NotImplementedError

    def make_aggregator(self, ckks):
        """The job's aggregator: plaintext when ``ckks`` is None, else the encrypted one."""
        raise NotImplementedError

    def workflow(self) -> None:
        """The job's rounds; raise JobFailed to fail the job with a reason."""
        raise NotImplementedError

    def identity(self) -> dict:
        """What a checkpoint must share with this job to be resumed by it."""
        raise NotImplementedError

    # --- the run -------------------------------------------------------------------------

    def run(self) -> None:
        fobs.register(TensorDecomposer)
        if self.server_threads:
            torch.set_num_threads(self.server_threads)
        self.out = os.path.join(self.get_run_dir(), RESULTS_DIRNAME)
        os.makedirs(self.out, exist_ok=True)
        self.log = {**self.new_log(), "rounds": [], "final": {}}
        self.rng = random.Random(self.seed)
        self.down: set[str] = set()  # sites FLARE declared dead in this job
        try:
            ckks = open_server_context(self.he_context, self.fl_ctx) if self.he else None
            self.aggregator = self.make_aggregator(ckks)
        except (HEContextError, ValueError) as e:
            self.fail(f"HE: {e}")
            return
        if self.aggregator.describe():
            self.log["he"] = self.aggregator.describe()
        try:
            self.workflow()
        except (JobFailed, CheckpointError) as e:
            self.fail(str(e))

    def fail(self, reason: str) -> None:
        self.log["error"] = reason
        self.write_json("metrics.json", self.log)
        self.panic(reason)

    def write_json(self, name: str, data: dict) -> None:
        """Atomically: a reader (or a crash) never sees half a file."""
        tmp = os.path.join(self.out, name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, default=str)
        os.replace(tmp, os.path.join(self.out, name))

    # --- sites ---------------------------------------------------------------------------

    def live_clients(self, rnd: int) -> list[str]:
        """The job's sites, less those FLARE declared dead: a task sent there would never run."""
        clients = sorted(c.name for c in self.engine.get_clients())
        down = {c for c in clients if self.communicator.get_client_disconnect_time(c)}
        if down - self.down:
            self.warning(f"round {rnd}: skipping site(s) FLARE declared disconnected: {sorted(down - self.down)}")
        self.down |= down
        return [c for c in clients if c not in down]

    def wait_for(self, rnd: int, enough: Callable[[list[str]], bool], what: str) -> list[str]:
        """The live sites once ``enough`` of them are connected; JobFailed after the wait timeout."""
        deadline = time.time() + self.wait_for_clients_timeout
        while True:
            clients = self.live_clients(rnd)
            if enough(clients):
                return clients
            if time.time() > deadline or self.abort_signal.triggered:
                raise JobFailed(f"round {rnd}: only {len(clients)} site(s) connected {clients}, {what} "
                                f"(waited {self.wait_for_clients_timeout:.0f}s)")
            time.sleep(1.0)

    def sample(self, rnd: int) -> list[str]:
        """This round's sites: every live one, or clients_per_round of them (at least min_clients)."""
        clients = self.wait_for(rnd, lambda c: len(c) >= self.min_clients, f"min_clients={self.min_clients}")
        k = self.clients_per_round
        return clients if not k or k >= len(clients) else sorted(self.rng.sample(clients, max(k, self.min_clients)))

    def require(self, rnd: int, valid: list[str], candidates: list[str], what: str = "valid update(s)") -> None:
        """JobFailed unless at least min_clients of the round's results are valid."""
        if len(valid) < self.min_clients:
            raise JobFailed(f"round {rnd}: {len(valid)} {what} from {valid}, min_clients={self.min_clients}; "
                            f"rejected or missing: {sorted(set(candidates) - set(valid))}")

    # --- tasks and results ---------------------------------------------------------------

    def receive(self, result: FLModel, record: dict, meta_keys=()) -> tuple[str, dict]:
        """Book one arriving result into ``record``: its bytes, metrics and ``meta_keys``; a result
        above max_result_bytes loses its params here (rejected when vetted)."""
        meta = result.meta if isinstance(result.meta, Mapping) else {}
        site = str(meta.get("client_name", "?"))
        entry = record["sites"].setdefault(site, {})
        tensor_bytes = params_bytes(result.params)  # a lower bound of its wire size, without encoding it again
        if self.max_result_bytes and tensor_bytes > self.max_result_bytes:
            entry["upload_bytes"] = tensor_bytes
        else:
            entry["upload_bytes"] = wire_bytes(result)
        if self.max_result_bytes and entry["upload_bytes"] > self.max_result_bytes:
            result.params = None  # do not hold an oversized payload until it is vetted
            entry["oversized"] = True
        entry["metrics"] = plain_json(result.metrics) if isinstance(result.metrics, Mapping) else {}
        for key in meta_keys:
            if key in meta:
                entry[key] = plain_json(meta[key])
        self.track(record, site, entry)
        return site, entry

    def track(self, record: dict, site: str, entry: dict) -> None:
        """A console line for a site's result; a training result's statistics (as received) and bytes
        streamed to the tracking receiver (step t: round t's training, as in the report)."""
        evaluated = "  ".join(f"{k} {v:.4f}" for k, v in (entry.get("metrics") or {}).items()
                              if k in ("eval_loss", "exact_match", "mc_accuracy") and isinstance(v, float))
        line = f"global of round {record['round']}: {evaluated or '-'}"
        if record.get("task") == "train":
            step, stats = record["round"] + 1, entry["train"] if isinstance(entry.get("train"), Mapping) else {}
            loss = stats.get("train_loss")
            line = (f"round {step}/{getattr(self, 'num_rounds', '?')}  {site:<12} train_loss "
                    f"{f'{loss:.4f}' if isinstance(loss, float) else '-'}  up {entry.get('upload_bytes', 0) / 1e6:.2f} MB  | {line}")
            with self.fl_ctx.get_engine().new_context() as fl_ctx:  # results may arrive on several threads
                server_scalars(fl_ctx, site, step, {**{k: stats.get(k) for k in TRAIN_KEYS},
                                                          **{k: entry.get(k) for k in ("upload_bytes", "download_bytes")},
                                                          "client_dp_epsilon": (entry.get("metrics") or {}).get("client_dp_epsilon")})
        else:
            line = f"{record.get('task')}  {site:<12} {line}"
        progress.info(line)

    def send(self, task: str, data: FLModel, targets: list[str], record: dict, callback) -> None:
        nbytes = wire_bytes(data)
        for site in targets:
            record["sites"].setdefault(site, {})["download_bytes"] = nbytes
        self.send_model(task_name=task, data=data, targets=targets, timeout=self.task_timeout, callback=callback)

    def wait_tasks(self) -> None:
        while self.get_num_standing_tasks() and not self.abort_signal.triggered:
            time.sleep(task_check_period(self))

    def vet(self, rnd: int, site: str, entry: dict, check: Callable[[], object], what: str = "update"):
        """``check()``'s value, or None when it raises: any exception from one site's data rejects
        that result (logged with the reason), never the round."""
        if entry.get("oversized"):
            reason = f"result of {entry['upload_bytes']} bytes exceeds max_result_bytes={self.max_result_bytes}"
        else:
            try:
                return check()
            except Exception as e:  # noqa: BLE001 - a site's data must not end the job
                reason = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
        self.error(f"round {rnd}: rejected {what} from {site}: {reason}")
        entry["rejected"] = reason
        return None

    # --- checkpoint ----------------------------------------------------------------------

    def open_checkpoint(self) -> tuple[RoundCheckpoint | None, Resumed | None]:
        """The checkpoint (if configured) and what it holds for this job (None: start at round 0)."""
        if not self.checkpoint_dir:
            return None, None
        meta = self.fl_ctx.get_prop(FLContextKey.JOB_META) or {}
        submitter = str(meta.get(JobMetaKey.SUBMITTER_NAME.value) or "local")
        if not is_plain_relative(submitter) or "/" in submitter or "\\" in submitter:  # one folder per submitter
            raise JobFailed(f"checkpoint_dir: the job's submitter name {submitter!r} cannot name a folder")
        directory = os.path.join(self.engine.get_workspace().get_root_dir(), CHECKPOINTS_DIRNAME, submitter,
                                 self.checkpoint_dir)
        checkpoint = RoundCheckpoint(directory)
        if not checkpoint.exists():
            self.info(f"checkpoint {directory}: none yet, starting at round 0")
            return checkpoint, None
        saved = checkpoint.load(self.identity())  # CheckpointError names the mismatching key
        self.log["rounds"] = saved.records
        self.log["resumed"] = {"from_round": len(saved.rounds), "checkpoint": directory}
        version, internal, gauss = saved.extra["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.info(f"checkpoint {directory}: resuming after {len(saved.rounds)} completed round(s)")
        return checkpoint, saved

    def save_checkpoint(self, checkpoint: RoundCheckpoint | None, rounds: list, extra: dict) -> None:
        if checkpoint is None:
            return
        version, internal, gauss = self.rng.getstate()
        checkpoint.save(self.identity(), rounds, self.log["rounds"], {"rng": [version, list(internal), gauss], **extra})


def plain_json(value, depth: int = 3):
    """A site's metrics or meta value as bounded plain JSON (str keys, numbers, short strings, at most
    ``depth`` levels and 100 items per level): what the results log records; anything else is dropped
    to its type name, so a site's data never breaks the log or what reads it."""
    if value is None or isinstance(value, (bool, int, float)):  # NaN stays a float: a site's eval may have none
        return value
    if isinstance(value, str):
        return value[:200]
    if depth > 0 and isinstance(value, Mapping):
        return {str(k)[:100]: plain_json(v, depth - 1) for k, v in list(value.items())[:100]}
    if depth > 0 and isinstance(value, (list, tuple)):
        return [plain_json(v, depth - 1) for v in value[:100]]
    return f"<{type(value).__name__}>"


def is_plain_relative(path: str) -> bool:
    """A relative path that stays below where it is joined: not absolute, no '..', no empty part."""
    parts = path.replace("\\", "/").split("/")
    return bool(path) and not os.path.isabs(path) and all(p not in ("", ".", "..") for p in parts)


def keep_args(component, args: dict) -> None:
    """Every constructor argument as a same-named attribute: FLARE's job export reads them back."""
    for key, value in args.items():
        if key not in ("self", "args", "kwargs", "__class__"):
            setattr(component, key, value)


def params_bytes(params) -> int:
    """The bytes of a result's tensors (and arrays) alone: what its encoding holds at least."""
    if not isinstance(params, Mapping):
        return 0
    return sum(int(getattr(v, "nbytes", 0)) if not isinstance(v, torch.Tensor) else v.numel() * v.element_size()
               for v in params.values())


def wire_bytes(model: FLModel) -> int:
    """Bytes of the message as FLARE's serializer (fobs, tensors via safetensors) encodes it."""
    return len(fobs.dumps(FLModelUtils.to_shareable(model)))


def task_layout(module_shapes, site_configs: dict, sites: list[str]) -> dict:
    """{"modules": [[prefix, out, in], ...], "lora": {site: [rank, alpha]}} for the sites that declared them."""
    meta = {}
    if module_shapes:
        meta["modules"] = [[prefix, *shape] for prefix, shape in module_shapes.items()]
    lora = {s: [c["rank"], float(c["alpha"])] for s in sites if "rank" in (c := site_configs.get(s, {})) and "alpha" in c}
    if lora:
        meta["lora"] = lora
    return meta
