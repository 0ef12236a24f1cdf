"""Every call into a private NVFlare API, in one place (pyproject pins ``nvflare>=2.9,<2.10``).

NVFlare 2.9 has no public way to do these; each function says why we need it. When a new
NVFlare release changes one, this is the only file to touch, and tests/test_nvflare_compat.py
(which calls each of them against the installed nvflare) says which.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time

log = logging.getLogger(__name__)


def export_requested() -> bool:
    """True when the command line asked to export the job (``--export``).

    ``nvflare.recipe.spec`` strips ``--export/--export-dir`` from sys.argv itself when first
    imported; a job needs to know before building the recipe whether it will run here (the sites'
    interpreter, the simulator's test-only HE keys).
    """
    return bool(_recipe_args()[0])


def export_dir() -> str:
    """The folder ``--export-dir`` names (nvflare's default ``./fl_job`` without it), also when
    ``--export`` is missing (``flare-lora export`` implies it)."""
    return _recipe_args()[1]


def _recipe_args() -> tuple:
    import warnings

    with warnings.catch_warnings():  # on import: "reserves --export, rename your flags"; ours have other names
        warnings.filterwarnings("ignore", message="NVFlare reserves", category=UserWarning)
        from nvflare.recipe.spec import _peek_recipe_args
    return _peek_recipe_args()


def start_poc_services(workspace: str, gpu_ids, excluded: list[str], services: list[str]) -> None:
    """Start POC services without nvflare's CLI (which reads ~/.nvflare and waits on a console).

    The isolated POC needs its own HOME, ports and workspace; ``nvflare poc start`` offers no
    hook for them, ``_start_poc`` is what it calls.
    """
    from nvflare.tool.poc.poc_commands import _start_poc

    _start_poc(poc_workspace=workspace, gpu_ids=gpu_ids, excluded=excluded, services_list=services)


def wait_poc_ready(workspace: str, excluded: list[str], timeout: int, attempt_s: int = 20) -> None:
    """Wait until every POC participant registered (the private half of ``nvflare poc start``).

    Each try runs in a process of its own, waits ``attempt_s`` and is killed 30 s later: nvflare
    2.9's admin session can hang for ever in ``close()`` (its connector thread waits on a connect
    that never resolves), which would hang the caller with it. A killed try is followed by a new one
    until ``timeout``; tries are short so that a hung one leaves time for another within a 60 s
    budget (a try as long as the budget left none).
    """
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        wait_s = max(1, int(min(attempt_s, remaining)))
        try:
            proc = subprocess.run([sys.executable, "-c", _READY_CHECK, workspace, str(wait_s), *excluded],
                                  capture_output=True, text=True, timeout=wait_s + 30)
        except subprocess.TimeoutExpired:
            log.warning("POC readiness check hung (nvflare admin session); trying again")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"POC {workspace}: not ready within {timeout}s (readiness checks hung)") from None
            continue
        if proc.returncode == 0:
            return
        if time.monotonic() >= deadline or "SystemStartTimeout" not in proc.stderr:
            raise RuntimeError(f"POC {workspace} not ready: {proc.stderr.strip()[-2000:]}")


_READY_CHECK = """
import sys
from nvflare.tool.poc.poc_commands import _wait_for_poc_system_ready, setup_service_config
workspace, timeout, excluded = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
project_config, service_config = setup_service_config(workspace)
_wait_for_poc_system_ready(workspace, project_config, service_config, [], excluded, timeout_in_sec=timeout)
"""


def submit_job(env, job) -> str:
    """Submit ``job`` through a PocEnv's admin session (its private ``_get_session_manager``).

    ``PocEnv.deploy``, the public way, first re-provisions and restarts the POC (wiping a running
    one) and then sleeps a fixed 3 s; the isolated POC is already up and every client registered.
    """
    return env._get_session_manager().submit_job(job)


def forget_admin_session(env) -> None:
    """Drop a PocEnv's cached admin session (private ``_session_manager``): PocEnv logs in again only
    when it has none, and a stopped or restarted server knows no earlier session."""
    env._session_manager = None


def relaunch_backend(executor, fl_ctx) -> None:
    """Replace a ClientAPIExecutor's dead external-process backend by a freshly launched one.

    nvflare 2.9 launches the trainer once per job (``initialize``); after it died every task
    fails. The backend is the executor's private ``_backend``; the new one is built the way
    ``ClientAPIExecutor.initialize`` builds it. Raises whatever the launch raises.
    """
    old, executor._backend = executor._backend, None
    if old is not None:
        old.finalize(fl_ctx)  # stops what is left of the old trainer's process group
    backend = executor._create_backend()
    backend.initialize(executor._build_backend_context(), fl_ctx)  # launches and waits for its HELLO
    executor._backend = backend


def launch_command(executor) -> str | list[str]:
    """The command a ClientAPIExecutor launches its trainer with (its private ``_command``)."""
    return executor._command


def set_launch_command(executor, command: str) -> None:
    """Replace that command before the executor builds its launcher (at START_RUN)."""
    executor._command = command


def task_check_period(controller) -> float:
    """How often a ModelController polls its standing tasks (a private attribute in 2.9)."""
    return float(getattr(controller, "_task_check_period", 0.5))


def recipe_job(recipe):
    """The FedJob a Recipe wraps (``Recipe._job``; nvflare 2.9 has no public accessor)."""
    return recipe._job


def default_log_config() -> dict:
    """FLARE's default logging dictConfig (``log_utils.default_log_dict``: a module global, not an API)."""
    from nvflare.fuel.utils import log_utils

    return log_utils.default_log_dict
