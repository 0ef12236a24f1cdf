"""An NVFlare POC of its own for ``job.py --env poc``: its own free ports, workspace and HOME.

nvflare's ``PocEnv`` runs the machine's default POC (ports 8002/8003, ``/tmp/nvflare/poc``,
``~/.nvflare``) and wipes a running one on deploy; :class:`IsolatedPocEnv` touches none of them,
so it cannot collide with a POC somebody else runs here. Its stop() stops what it started and
nothing else: nvflare's admin shutdown, then, by pid, what FLARE's pid files in its workspace still
name (components/flare/poc_processes.py). tests/poc_harness.py adds what only tests need.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import yaml
from nvflare.recipe import PocEnv

from flare_lora.components.flare.nvflare_compat import (
    forget_admin_session,
    start_poc_services,
    submit_job,
    wait_poc_ready,
)
from flare_lora.components.flare.poc_processes import FL_FILES, site_pid, site_pids, terminate
from flare_lora.components.flare.poc_project import (
    DEFAULT_ADMIN,
    SERVER_NAME,
    build_project_config,
    check_project,
    find_free_ports,
    poc_prod_dir,
    port_free,
    with_server_ports,
)

logger = logging.getLogger(__name__)

NVFLARE_DEFAULT_POC_WORKSPACE = "/tmp/nvflare/poc"
WORKSPACE_MARKER = ".flare_lora_poc"  # provision() only wipes an existing workspace carrying this file

LocalContent = Union[str, bytes, Mapping[str, Any], Sequence[Any]]


@contextlib.contextmanager
def _patched_environ(overrides: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _write_local_file(path: Path, content: LocalContent) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content, indent=2))


class IsolatedPocEnv(PocEnv):
    """A real :class:`nvflare.recipe.PocEnv` confined to its own workspace, ports and HOME.

    ``provision()`` → ``start()`` → ``deploy(job)`` (``recipe.run/execute(env)``) → ``stop()``;
    ``deploy`` provisions and starts on demand, never wipes a running POC (``PocEnv.deploy`` does)
    and submits once every client registered. ``workspace`` must be absent, empty or made by this
    class (provisioning wipes it); ``home`` defaults to ``<workspace>_home`` (HF_HOME, TORCH_HOME
    and PYTHONUSERBASE keep the real HOME's, so model caches stay visible). ``local_files``
    (``{site: {name: str, bytes or JSON}}``) go into each site's ``local/`` and ``on_provisioned(env)``
    runs, after provisioning. ``project``: a project.yml config instead of nvflare's POC template
    (components/flare/poc_project.py says what it must name); its server gets our ports.
    """

    ready_timeout = 60.0  # seconds for every client to register

    def __init__(self, clients: Sequence[str], workspace: Union[str, Path], *, home: Union[str, Path, None] = None,
                 local_files: Optional[Mapping[str, Mapping[str, LocalContent]]] = None,
                 on_provisioned: Optional[Callable[["IsolatedPocEnv"], None]] = None, username: str = DEFAULT_ADMIN,
                 project: Optional[Mapping] = None):
        clients = list(clients)
        if not clients or len(set(clients)) != len(clients) or SERVER_NAME in clients:
            raise ValueError(f"clients must be non-empty, unique and not '{SERVER_NAME}': {clients}")
        workspace = os.path.abspath(str(workspace))
        if os.path.realpath(workspace) in (os.path.realpath(NVFLARE_DEFAULT_POC_WORKSPACE), "/"):
            raise ValueError(f"refusing to use {workspace!r}: it is shared (nvflare's default POC workspace)")
        self.workspace = workspace
        self.home = os.path.abspath(str(home)) if home else workspace.rstrip("/") + "_home"
        self.fed_learn_port, self.admin_port = find_free_ports(2)
        self.project = check_project(project, clients, username) if project is not None else None
        self.local_files = {site: dict(files) for site, files in (local_files or {}).items()}
        self.on_provisioned = on_provisioned
        self._provisioned = False
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        caches = {"HF_HOME": os.path.join(cache, "huggingface"), "TORCH_HOME": os.path.join(cache, "torch"),
                  "PYTHONUSERBASE": os.path.join(os.path.expanduser("~"), ".local")}
        self._cache_env = {k: v for k, v in caches.items() if k not in os.environ}  # the real HOME's, before patching
        os.makedirs(self.home, exist_ok=True)
        with self._env():
            super().__init__(num_clients=len(clients), clients=clients, username=username)
        self.poc_workspace = workspace  # what get_poc_workspace() returned under _env()

    def environ(self) -> dict[str, str]:
        """The environment of nvflare calls and POC processes (also for ``nvflare`` CLI subprocesses)."""
        env = {"HOME": self.home, "NVFLARE_POC_WORKSPACE": self.workspace, **self._cache_env}
        if self._provisioned:
            env["NVFLARE_STARTUP_KIT_DIR"] = self.admin_dir
        return env

    def _env(self):
        return _patched_environ(self.environ())

    @property
    def prod_dir(self) -> str:
        return poc_prod_dir(self.workspace)

    @property
    def admin_dir(self) -> str:
        return os.path.join(self.prod_dir, self.username)

    def site_dir(self, site: str) -> str:
        """Startup kit (and runtime workspace) of ``site`` (``"server"`` for the server)."""
        return os.path.join(self.prod_dir, site)

    def local_dir(self, site: str) -> str:
        return os.path.join(self.site_dir(site), "local")

    @property
    def participants(self) -> list[str]:
        return [SERVER_NAME, *self.clients]

    def provision(self) -> str:
        """(Re)create the workspace: project.yml with our ports and clients, startup kits, local files."""
        from nvflare.tool.poc.poc_commands import prepare_poc_provision

        if self.is_running():
            raise RuntimeError(f"POC in {self.workspace} is running; stop() it before provisioning")
        if os.path.isdir(self.workspace) and os.listdir(self.workspace):
            if not os.path.isfile(os.path.join(self.workspace, WORKSPACE_MARKER)):
                raise ValueError(f"{self.workspace} is not empty and not an IsolatedPocEnv workspace; refusing to wipe it")
            shutil.rmtree(self.workspace)
        os.makedirs(self.workspace, exist_ok=True)
        Path(self.workspace, WORKSPACE_MARKER).write_text(f"POC workspace owned by {__name__}\n")
        ports = {"fed_learn_port": self.fed_learn_port, "admin_port": self.admin_port}
        config = (with_server_ports(self.project, **ports) if self.project is not None
                  else build_project_config(self.clients, admin=self.username, **ports))
        project_file = Path(self.workspace, "project.yml")
        project_file.write_text(yaml.safe_dump(config, sort_keys=False))
        with self._env():
            prepare_poc_provision(clients=[], number_of_clients=0, workspace=self.workspace, docker_image=None,
                                  use_he=False, project_conf_path=str(project_file), examples_dir=None)
        self._provisioned = True
        for site, files in self.local_files.items():
            if site not in self.participants:
                raise ValueError(f"local_files: unknown site {site!r}; expected one of {self.participants}")
            for name, content in files.items():
                _write_local_file(Path(self.local_dir(site), name), content)
        if self.on_provisioned is not None:
            self.on_provisioned(self)
        return self.prod_dir

    def live_processes(self) -> dict[int, bool]:
        """What this env started and still runs (FLARE's pid files name), pid -> is an FL process."""
        if not self._provisioned:
            return {}
        return {pid: fl for name in self.participants for pid, fl in site_pids(self.site_dir(name)).items()}

    def is_running(self) -> bool:
        return bool(self.live_processes())

    def start(self) -> None:
        """Start the server and clients (no admin console); return once every client registered."""
        if not self._provisioned:
            self.provision()
        if self.is_running():
            raise RuntimeError(f"POC in {self.workspace} is already running")
        busy = [p for p in (self.fed_learn_port, self.admin_port) if not port_free(p)]
        if busy:
            logger.warning("ports %s got taken; re-picking and re-provisioning", busy)
            self.fed_learn_port, self.admin_port = find_free_ports(2)
            self.provision()
        try:
            self._start_services([])
            self.wait_ready()
        except BaseException:
            try:
                self.stop()
            except Exception as e:  # keep the start failure as the primary error
                logger.error("cleanup after failed start: %s", e)
            raise

    def _start_services(self, services: list[str]) -> None:
        # nvflare Popen()s the services in the caller's cwd, and `python -m` puts that cwd first on
        # the FL parents' sys.path, which their job processes inherit: start them from the workspace.
        cwd = os.getcwd()
        try:
            with self._env():
                os.chdir(self.workspace)
                start_poc_services(self.workspace, self.gpu_ids, [] if services else [self.username], services)
        finally:
            os.chdir(cwd)

    def wait_ready(self, timeout: Optional[float] = None) -> None:
        """Wait until the server and every client are up and registered."""
        with self._env():
            wait_poc_ready(self.workspace, [self.username], int(timeout or self.ready_timeout))
        forget_admin_session(self)  # a (re)started server knows no earlier admin session

    def deploy(self, job) -> str:
        from nvflare.recipe.utils import collect_non_local_scripts

        missing = collect_non_local_scripts(job)
        if missing:
            raise ValueError(f"The following scripts do not exist locally: {missing}")
        if not self.is_running():
            self.start()
        with self._env():
            return submit_job(self, job)

    def get_job_status(self, job_id: str) -> Optional[str]:
        with self._env():
            return super().get_job_status(job_id)

    def abort_job(self, job_id: str) -> None:
        with self._env():
            super().abort_job(job_id)

    def get_job_result(self, job_id: str, timeout: float = 0.0) -> Optional[str]:
        with self._env():
            return super().get_job_result(job_id, timeout)

    def stop(self, clean_up: bool = False, grace: float = 20.0) -> None:
        """Stop what this env started (idempotent; safe after a failed start or job).

        If the server runs, nvflare's admin ``shutdown all`` (without nvflare's wait, which in 2.9
        polls the dead server for 30 s) and up to ``grace`` s for the FL processes to exit; then
        SIGTERM/SIGKILL by pid what is left and remove FLARE's pid files, so the workspace starts
        clean. Raises RuntimeError if a process survives SIGKILL.
        """
        from nvflare.tool.api_utils import shutdown_system

        forget_admin_session(self)
        left = []
        if self.live_processes():
            server_dir = self.site_dir(SERVER_NAME) if self._provisioned else ""
            deadline = time.monotonic()
            if server_dir and site_pid(os.path.join(server_dir, "pid.fl"), server_dir) is not None:
                try:
                    with self._env():
                        shutdown_system(self.prod_dir, username=self.username, wait=False, verbose=False)
                    deadline += grace
                except Exception as e:  # the graceful path failed: stop by pid
                    logger.warning("admin shutdown of POC %s failed: %s", self.workspace, e)
            while time.monotonic() < deadline and any(self.live_processes().values()):
                time.sleep(0.25)
            left = terminate(self.live_processes)
        if self._provisioned and os.path.isdir(self.workspace):
            for name in self.participants:
                for file in FL_FILES:
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(self.site_dir(name), file))
        if left:
            raise RuntimeError(f"POC processes survived SIGKILL: {left}")
        if clean_up and os.path.isdir(self.workspace):
            shutil.rmtree(self.workspace, ignore_errors=True)
