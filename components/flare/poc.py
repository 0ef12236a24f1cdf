"""Isolated NVFlare POC harness for tests and walkthrough scripts.

Runs a real FLARE POC deployment (server + client processes + admin API) on this
machine **without touching** the default POC (ports 8002/8003, ``/tmp/nvflare/poc``)
or the user's ``~/.nvflare``:

* ports: two free TCP ports are picked at runtime (bind to port 0) and written as
  ``fed_learn_port`` / ``admin_port`` of the server participant in a project.yml
  that lives in the harness' own POC workspace;
* workspace: ``NVFLARE_POC_WORKSPACE`` is pointed at that workspace for every nvflare
  call made by the harness (``PocEnv`` reads it via ``get_poc_workspace()``);
* HOME: ``HOME`` is pointed at a private directory for every nvflare call, so nothing
  under ``~/.nvflare`` is read or written. The POC processes inherit this environment
  (``nvflare.tool.poc`` starts them with ``os.environ.copy()``); the environment of the
  calling process is restored after each call.

Processes are stopped with nvflare's own admin shutdown first; anything still alive whose
command line references the workspace (and its descendants) is then terminated by pid.
Nothing is ever killed by name.

Usage::

    from flare_lora.components.flare.poc import isolated_poc, run_job_in_poc

    # one-shot: run a recipe, keep the logs, always stop the POC
    status, result_dir = run_job_in_poc(recipe, ["site-1", "site-2"], "/tmp/my_poc", timeout=300)

    # fine-grained: write site-local files, inspect pids, kill a site mid-round
    with isolated_poc(["site-1", "site-2"], "/tmp/my_poc",
                      local_files={"site-1": {"privacy.json": {...}}}) as env:
        run = recipe.execute(env)          # or recipe.run(env)
        env.pids()                         # {"server": ParticipantPids(...), "site-1": ...}
        env.kill_site("site-2")            # SIGKILL site-2 (and keep it down)
        result_dir = run.get_result(timeout=300, clean_up=False)
    poc_log_paths("/tmp/my_poc", job_id=run.get_job_id())

No test-framework imports here: the module is also used by README walkthrough scripts.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import yaml

from nvflare.recipe import PocEnv

logger = logging.getLogger(__name__)

DEFAULT_ADMIN = "admin@nvidia.com"
DEFAULT_PROJECT_NAME = "flare_lora_poc"
SERVER_NAME = "server"
ORG = "nvidia"
NVFLARE_DEFAULT_POC_WORKSPACE = "/tmp/nvflare/poc"
WORKSPACE_MARKER = ".flare_lora_poc"  # provision() only wipes an existing workspace carrying this file

LocalContent = Union[str, bytes, Mapping[str, Any], Sequence[Any]]
LocalFiles = Mapping[str, Mapping[str, LocalContent]]


# --------------------------------------------------------------------------- helpers


def find_free_ports(n: int = 2, host: str = "127.0.0.1") -> list[int]:
    """Return ``n`` distinct currently-free TCP ports (sockets held open together, then closed)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def build_project_config(
    clients: Sequence[str],
    *,
    fed_learn_port: int,
    admin_port: int,
    project_name: str = DEFAULT_PROJECT_NAME,
    admin: str = DEFAULT_ADMIN,
) -> dict:
    """project.yml content: nvflare's own POC template (same builders) with our participants/ports."""
    import nvflare.lighter as lighter

    with open(os.path.join(os.path.dirname(lighter.__file__), "dummy_project.yml")) as f:
        template = yaml.safe_load(f)
    config = copy.deepcopy(template)
    config["name"] = project_name
    config["participants"] = [
        {
            "name": SERVER_NAME,
            "type": "server",
            "org": ORG,
            "fed_learn_port": int(fed_learn_port),
            "admin_port": int(admin_port),
            "default_host": "localhost",
        },
        *({"name": c, "type": "client", "org": ORG} for c in clients),
        {"name": admin, "type": "admin", "org": ORG, "role": "project_admin"},
    ]
    return config


def write_project_yml(path: Union[str, Path], clients: Sequence[str], *, fed_learn_port: int, admin_port: int,
                      project_name: str = DEFAULT_PROJECT_NAME, admin: str = DEFAULT_ADMIN) -> str:
    config = build_project_config(
        clients, fed_learn_port=fed_learn_port, admin_port=admin_port, project_name=project_name, admin=admin
    )
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def with_server_ports(project: Mapping, *, fed_learn_port: int, admin_port: int) -> dict:
    """A copy of a project.yml config whose server listens on these ports, on localhost."""
    config = copy.deepcopy(dict(project))
    for p in config.get("participants", []):
        if p.get("type") == "server":
            p.update(fed_learn_port=int(fed_learn_port), admin_port=int(admin_port), default_host="localhost")
    return config


def _load_project(workspace: str) -> dict:
    with open(os.path.join(workspace, "project.yml")) as f:
        return yaml.safe_load(f)


def poc_prod_dir(workspace: Union[str, Path]) -> str:
    """``<workspace>/<project>/prod_NN`` (latest), as nvflare resolves it."""
    from nvflare.tool.poc.poc_commands import get_prod_dir

    workspace = os.path.abspath(str(workspace))
    return get_prod_dir(workspace, _load_project(workspace).get("name"))


def poc_participants(workspace: Union[str, Path]) -> dict[str, list[str]]:
    project = _load_project(os.path.abspath(str(workspace)))
    out: dict[str, list[str]] = {"server": [], "client": [], "admin": []}
    for p in project.get("participants", []):
        out.setdefault(p["type"], []).append(p["name"])
    return out


def poc_log_paths(workspace: Union[str, Path], job_id: Optional[str] = None) -> dict[str, dict[str, str]]:
    """Existing log files of the server and each client (usable after the POC was stopped).

    Keys per participant: ``console`` (stdout/stderr of the service, ``poc_console.log``),
    ``log`` (parent process ``log.txt``), ``error_log`` (``log_error.txt``), and, when
    ``job_id`` is given, ``job_log`` / ``job_error_log`` (``<job_id>/log.txt`` of the
    job process). Only files that exist are returned.
    """
    prod = poc_prod_dir(workspace)
    parts = poc_participants(workspace)
    out: dict[str, dict[str, str]] = {}
    for name in parts.get("server", []) + parts.get("client", []):
        site_dir = os.path.join(prod, name)
        cands = {
            "console": os.path.join(site_dir, "poc_console.log"),
            "log": os.path.join(site_dir, "log.txt"),
            "error_log": os.path.join(site_dir, "log_error.txt"),
        }
        if job_id:
            cands["job_log"] = os.path.join(site_dir, job_id, "log.txt")
            cands["job_error_log"] = os.path.join(site_dir, job_id, "log_error.txt")
        out[name] = {k: v for k, v in cands.items() if os.path.isfile(v)}
    return out


# ----------------------------------------------------------------- process bookkeeping


@dataclass
class ParticipantPids:
    """Processes of one POC participant (server or client) started by this harness."""

    name: str
    daemon: Optional[int] = None  # the sub_start.sh watchdog loop (restarts `main` if it dies)
    main: Optional[int] = None  # the parent FL process (server_train / client_train)
    jobs: list[int] = field(default_factory=list)  # job processes (children of `main`)
    trainers: list[int] = field(default_factory=list)  # what the job processes launched (client scripts)
    all: list[int] = field(default_factory=list)  # every live process of this participant


def _read_proc(pid: int) -> Optional[tuple[int, int, list[str]]]:
    """(ppid, uid, argv) for a live pid, or None."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        # field 4 is ppid; comm (field 2) may contain spaces/parentheses
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        uid = os.stat(f"/proc/{pid}").st_uid
        state = stat.rsplit(")", 1)[1].split()[0]
        if state == "Z":
            return None
        return ppid, uid, argv
    except (OSError, ValueError, IndexError):
        return None


def _process_table() -> dict[int, tuple[int, int, list[str]]]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _read_proc(int(entry))
            if info is not None:
                table[int(entry)] = info
    return table


def _refs_path(argv: Sequence[str], root: str) -> bool:
    root = root.rstrip("/")
    for arg in argv:
        for token in arg.split("="):  # also catches --opt=/path
            if token == root or token.startswith(root + "/"):
                return True
    return False


def _descendants(table: Mapping[int, tuple[int, int, list[str]]], roots: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = set(), list(roots)
    while stack:
        pid = stack.pop()
        if pid in out:
            continue
        out.add(pid)
        stack.extend(children.get(pid, []))
    return out


def _ancestors(table: Mapping[int, tuple[int, int, list[str]]], pid: int) -> set[int]:
    out: set[int] = set()
    while pid > 0 and pid not in out:
        out.add(pid)
        info = table.get(pid)
        if info is None:
            break
        pid = info[0]
    return out


def workspace_processes(workspace: Union[str, Path]) -> dict[int, list[str]]:
    """Live processes (of this uid) whose command line references ``workspace``, plus their descendants.

    This is how the harness identifies "what it started": the POC daemons, FL parents and job
    processes all carry their startup-kit path (under the workspace) on their command line.
    """
    roots = {os.path.abspath(str(workspace)), os.path.realpath(str(workspace))}
    me = os.getuid()
    table = _process_table()
    own = _ancestors(table, os.getpid())  # the caller and what launched it (a shell, timeout, time)
    matched = {
        pid
        for pid, (_, uid, argv) in table.items()
        if uid == me and pid not in own and any(_refs_path(argv, r) for r in roots)
    }
    pids = _descendants(table, matched) - own
    return {pid: table[pid][2] for pid in sorted(pids) if pid in table and table[pid][1] == me}


def _read_pid_file(path: str, site_dir: str) -> Optional[int]:
    """pid from a POC ``*.fl`` pid file, only if alive and really a process of ``site_dir``."""
    try:
        with open(path) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    info = _read_proc(pid)
    if info is None or info[1] != os.getuid() or not _refs_path(info[2], site_dir):
        return None  # stale file (pid gone or reused by an unrelated process)
    return pid


def _is_python(argv: Sequence[str]) -> bool:
    return bool(argv) and "python" in os.path.basename(argv[0])


def _signal_pids(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            logger.warning("no permission to signal pid %s", pid)


def _wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while True:
        alive = [p for p in alive if _read_proc(p) is not None]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.2)


def _wait_reaped(pids: Sequence[int], timeout: float) -> None:
    """Wait until ``pids`` no longer exist, zombies included (a restart script's ``kill -0`` sees those)."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:  # pid reused by another user's process: ours is gone
                break
            time.sleep(0.1)


def terminate_workspace_processes(workspace: Union[str, Path], term_timeout: float = 5.0,
                                  kill_timeout: float = 5.0) -> list[int]:
    """SIGTERM then SIGKILL every process returned by :func:`workspace_processes`.

    Watchdog daemons (``sub_start.sh``) are signalled first so they cannot restart the FL
    processes. Returns the pids that are still alive afterwards (should be empty).
    """
    for sig, timeout in ((signal.SIGTERM, term_timeout), (signal.SIGKILL, kill_timeout)):
        procs = workspace_processes(workspace)
        if not procs:
            return []
        daemons = [p for p, argv in procs.items() if any(a.endswith("sub_start.sh") for a in argv)]
        _signal_pids(daemons, sig)
        _signal_pids([p for p in procs if p not in daemons], sig)
        _wait_gone(list(procs), timeout)
    return sorted(workspace_processes(workspace))


# ----------------------------------------------------------------------- environment


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


@contextlib.contextmanager
def _chdir(path: str) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _write_local_file(local_dir: str, name: str, content: LocalContent) -> str:
    path = os.path.join(local_dir, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if isinstance(content, bytes):
        with open(path, "wb") as f:
            f.write(content)
    elif isinstance(content, str):
        with open(path, "w") as f:
            f.write(content)
    else:
        with open(path, "w") as f:
            json.dump(content, f, indent=2)
    return path


# ------------------------------------------------------------------------ the env


def _check_project(project: Mapping, clients: Sequence[str], username: str) -> dict:
    parts = project.get("participants", [])
    servers = [p["name"] for p in parts if p.get("type") == "server"]
    got = [p["name"] for p in parts if p.get("type") == "client"]
    admins = [p["name"] for p in parts if p.get("type") == "admin"]
    if servers != [SERVER_NAME] or sorted(got) != sorted(clients) or username not in admins:
        raise ValueError(
            f"project {project.get('name')!r}: expected server [{SERVER_NAME!r}], clients {sorted(clients)} and admin "
            f"{username!r}; got server {servers}, clients {sorted(got)}, admins {admins}"
        )
    return dict(project)


class IsolatedPocEnv(PocEnv):
    """A real :class:`nvflare.recipe.PocEnv` confined to its own workspace, ports and HOME.

    Lifecycle: ``provision()`` → (write site ``local/`` files) → ``start()`` → ``deploy(job)``
    (what ``recipe.run/execute(env)`` calls) → ``stop()``. ``deploy`` provisions/starts
    on demand, so ``recipe.execute(IsolatedPocEnv(...))`` works like with ``PocEnv``; unlike
    ``PocEnv.deploy`` it does **not** wipe a running POC, and it waits until every client has
    registered (instead of a fixed 3 s sleep) before submitting.

    Args:
        clients: client site names.
        workspace: POC workspace directory owned by this env: must be absent, empty, or a previous
            workspace of this harness (``provision()`` wipes it).
        fed_learn_port / admin_port: server ports; free ports are picked when None.
        home: HOME for nvflare calls and POC processes (default ``<workspace>_home``).
        local_files: ``{site: {relative_name: content}}`` written into the site's startup kit
            ``local/`` dir after provisioning, before start (str/bytes verbatim, else JSON).
        on_provisioned: optional ``callback(env)`` run after provisioning + local files, before start.
        ready_timeout: seconds to wait for all clients to register at start.
        extra_env: additional environment for the POC processes (e.g. ``CUDA_VISIBLE_DEVICES``).
        project: a project.yml config to provision instead of nvflare's POC template (e.g. a
            production template, components/flare/provision.py); its server must be named
            ``"server"``, its clients must be ``clients`` and ``username`` one of its admins. The
            server's ports and host are replaced by this env's.
        keep_user_caches: point HF_HOME / TORCH_HOME / PYTHONUSERBASE at the real HOME's
            locations (unless already set), so the isolated HOME does not hide model caches.
    """

    def __init__(
        self,
        clients: Sequence[str],
        workspace: Union[str, Path],
        *,
        fed_learn_port: Optional[int] = None,
        admin_port: Optional[int] = None,
        home: Union[str, Path, None] = None,
        local_files: Optional[LocalFiles] = None,
        on_provisioned: Optional[Callable[["IsolatedPocEnv"], None]] = None,
        ready_timeout: float = 60.0,
        extra_env: Optional[Mapping[str, str]] = None,
        keep_user_caches: bool = True,
        gpu_ids: Optional[list[int]] = None,
        project_name: str = DEFAULT_PROJECT_NAME,
        username: str = DEFAULT_ADMIN,
        study: Optional[str] = None,
        extra: Optional[dict] = None,
        project: Optional[Mapping] = None,
    ):
        clients = list(clients)
        if not clients or len(set(clients)) != len(clients) or SERVER_NAME in clients:
            raise ValueError(f"clients must be non-empty, unique and not '{SERVER_NAME}': {clients}")
        workspace = os.path.abspath(str(workspace))
        if os.path.realpath(workspace) in (os.path.realpath(NVFLARE_DEFAULT_POC_WORKSPACE), "/"):
            raise ValueError(f"refusing to use {workspace!r}: it is shared (nvflare's default POC workspace)")
        self.workspace = workspace
        self.home = os.path.abspath(str(home)) if home else workspace.rstrip("/") + "_home"
        self._auto_ports = fed_learn_port is None and admin_port is None
        self.fed_learn_port, self.admin_port = self._pick_ports(fed_learn_port, admin_port)
        self.project = _check_project(project, clients, username) if project is not None else None
        self.project_name = self.project["name"] if self.project is not None else project_name
        self.local_files: dict[str, dict[str, LocalContent]] = {
            site: dict(files) for site, files in (local_files or {}).items()
        }
        self.on_provisioned = on_provisioned
        self.ready_timeout = ready_timeout
        self.extra_env = dict(extra_env or {})
        self.keep_user_caches = keep_user_caches
        self.timings: dict[str, float] = {}
        self._provisioned = False
        self._submitted_at: Optional[float] = None
        # snapshot of the *real* HOME's cache locations, taken before any patching
        self._cache_env: dict[str, str] = {}
        if keep_user_caches:
            cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            for k, v in (("HF_HOME", os.path.join(cache, "huggingface")), ("TORCH_HOME", os.path.join(cache, "torch")),
                         ("PYTHONUSERBASE", os.path.join(os.path.expanduser("~"), ".local"))):
                if k not in os.environ:
                    self._cache_env[k] = v
        os.makedirs(self.home, exist_ok=True)
        with self._env():
            super().__init__(num_clients=len(clients), clients=clients, gpu_ids=gpu_ids, username=username,
                             extra=extra, **({"study": study} if study else {}))
        self.poc_workspace = workspace  # same value get_poc_workspace() returned under _env()

    # ---------------------------------------------------------------- environment
    @staticmethod
    def _pick_ports(fed_learn_port: Optional[int], admin_port: Optional[int]) -> tuple[int, int]:
        free = iter(find_free_ports(2))
        f = int(fed_learn_port) if fed_learn_port is not None else next(free)
        a = int(admin_port) if admin_port is not None else next(free)
        if f == a:  # nvflare allows a shared port, but keep them distinct unless asked
            a = next(free)
        return f, a

    def environ(self) -> dict[str, str]:
        """Environment overrides applied to nvflare calls and inherited by the POC processes.

        Also handy for ``subprocess.run(["nvflare", ...], env={**os.environ, **env.environ()})``.
        """
        env = {"HOME": self.home, "NVFLARE_POC_WORKSPACE": self.workspace}
        if self._provisioned:
            env["NVFLARE_STARTUP_KIT_DIR"] = self.admin_dir
        env.update(self._cache_env)
        env.update(self.extra_env)
        return env

    def _env(self):
        return _patched_environ(self.environ())

    # ---------------------------------------------------------------- layout
    @property
    def project_file(self) -> str:
        return os.path.join(self.workspace, "project.yml")

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

    # ---------------------------------------------------------------- lifecycle
    def provision(self) -> str:
        """(Re)create the workspace: project.yml with our ports/clients, startup kits, local files."""
        if self.is_running():
            raise RuntimeError(f"POC in {self.workspace} is running; stop() it before provisioning")
        from nvflare.tool.poc.poc_commands import prepare_poc_provision

        t0 = time.monotonic()
        if os.path.isdir(self.workspace) and os.listdir(self.workspace):
            if not os.path.isfile(os.path.join(self.workspace, WORKSPACE_MARKER)):
                raise ValueError(
                    f"{self.workspace} is not empty and was not created by this harness; refusing to wipe it"
                )
            shutil.rmtree(self.workspace)
        os.makedirs(self.workspace, exist_ok=True)
        Path(self.workspace, WORKSPACE_MARKER).write_text("POC workspace owned by flare_lora.components.flare.poc\n")
        if self.project is None:
            write_project_yml(self.project_file, self.clients, fed_learn_port=self.fed_learn_port,
                              admin_port=self.admin_port, project_name=self.project_name, admin=self.username)
        else:
            with open(self.project_file, "w") as f:
                config = with_server_ports(self.project, fed_learn_port=self.fed_learn_port, admin_port=self.admin_port)
                yaml.safe_dump(config, f, sort_keys=False)
        with self._env():
            prepare_poc_provision(
                clients=[], number_of_clients=0, workspace=self.workspace, docker_image=None,
                use_he=self.use_he, project_conf_path=self.project_file, examples_dir=None,
            )
        self._provisioned = True
        for site, files in self.local_files.items():
            for name, content in files.items():
                self._write_local(site, name, content)
        if self.on_provisioned is not None:
            self.on_provisioned(self)
        self.timings["provision_s"] = time.monotonic() - t0
        return self.prod_dir

    def _write_local(self, site: str, name: str, content: LocalContent) -> str:
        if site not in self.participants:
            raise ValueError(f"unknown site {site!r}; expected one of {self.participants}")
        return _write_local_file(self.local_dir(site), name, content)

    def write_local_file(self, site: str, name: str, content: LocalContent) -> str:
        """Add a file to ``site``'s ``local/`` dir. Takes effect at the next (re)start of that site.

        Recorded so it is re-applied if the workspace is re-provisioned. Note: a client's
        ``local/resources.json`` replaces ``resources.json.default`` entirely; start from the
        ``.default`` file (``env.local_dir(site)``) when overriding it.
        """
        self.local_files.setdefault(site, {})[name] = content
        return self._write_local(site, name, content) if self._provisioned else ""

    def is_running(self) -> bool:
        """True when any process of this workspace is alive (not only the server)."""
        return bool(workspace_processes(self.workspace))

    def start(self) -> None:
        """Start server + clients (no admin console) and wait until every client registered."""
        from nvflare.tool.poc.poc_commands import (
            _start_poc,
            _wait_for_poc_system_ready,
            setup_service_config,
        )

        if not self._provisioned:
            self.provision()
        if self.is_running():
            raise RuntimeError(f"POC in {self.workspace} is already running")
        busy = [p for p in (self.fed_learn_port, self.admin_port) if not _port_free(p)]
        if busy:
            if not self._auto_ports:
                raise RuntimeError(f"POC port(s) {busy} already in use")
            logger.warning("ports %s got taken; re-picking and re-provisioning", busy)
            self.fed_learn_port, self.admin_port = self._pick_ports(None, None)
            self.provision()
        t0 = time.monotonic()
        try:
            with self._env(), _chdir(self.workspace):
                # nvflare Popen()s the services in the caller's cwd, and `python -m` puts that cwd
                # first on the FL parents' sys.path, which the job processes inherit via PYTHONPATH.
                # Start them from the workspace so behaviour does not depend on where we are called.
                _start_poc(poc_workspace=self.workspace, gpu_ids=self.gpu_ids, excluded=[self.username],
                           services_list=[])
                project_config, service_config = setup_service_config(self.workspace)
                _wait_for_poc_system_ready(self.workspace, project_config, service_config, [], [self.username],
                                           timeout_in_sec=int(self.ready_timeout))
        except BaseException:
            try:
                self.stop()
            except Exception as e:  # keep the start failure as the primary error
                logger.error("cleanup after failed start: %s", e)
            raise
        self.timings["start_s"] = time.monotonic() - t0

    def start_participant(self, name: str) -> None:
        """(Re)start one participant, e.g. after :meth:`kill_site` (``nvflare poc start -p <name>``)."""
        from nvflare.tool.poc.poc_commands import _start_poc

        if name not in self.participants:
            raise ValueError(f"unknown participant {name!r}; expected one of {self.participants}")
        with self._env(), _chdir(self.workspace):
            _start_poc(poc_workspace=self.workspace, gpu_ids=self.gpu_ids, excluded=[], services_list=[name])

    def wait_ready(self, timeout: Optional[float] = None) -> None:
        """Wait until the server and every client are up and registered (after restarts)."""
        from nvflare.tool.poc.poc_commands import _wait_for_poc_system_ready, setup_service_config

        with self._env(), _chdir(self.workspace):
            project_config, service_config = setup_service_config(self.workspace)
            _wait_for_poc_system_ready(self.workspace, project_config, service_config, [], [self.username],
                                       timeout_in_sec=int(timeout or self.ready_timeout))
        self._session_manager = None  # a restarted server knows no earlier admin session

    def deploy(self, job) -> str:
        from nvflare.recipe.utils import collect_non_local_scripts

        missing = collect_non_local_scripts(job)
        if missing:
            raise ValueError(f"The following scripts do not exist locally: {missing}")
        if not self.is_running():
            self.start()
        t0 = time.monotonic()
        with self._env():
            job_id = self._get_session_manager().submit_job(job)
        self.timings["submit_s"] = time.monotonic() - t0
        self._submitted_at = time.monotonic()
        return job_id

    def get_job_status(self, job_id: str) -> Optional[str]:
        with self._env():
            return super().get_job_status(job_id)

    def abort_job(self, job_id: str) -> None:
        with self._env():
            super().abort_job(job_id)

    def get_job_result(self, job_id: str, timeout: float = 0.0) -> Optional[str]:
        with self._env():
            result = super().get_job_result(job_id, timeout)
        if self._submitted_at is not None:
            self.timings["job_s"] = time.monotonic() - self._submitted_at
        return result

    def stop(self, clean_up: bool = False, grace: float = 20.0) -> None:
        """Stop everything this env started. Idempotent; safe after failed starts/jobs.

        1. if the server is up: nvflare's admin ``shutdown all`` (``shutdown_system``; aborts
           running jobs, server tells clients to shut down) without nvflare's own wait, which
           in 2.9 polls a dead server until its 30 s timeout (``PocEnv.stop`` spends ~30 s there);
        2. wait up to ``grace`` s for the FL (python) processes of the workspace to exit;
        3. SIGTERM, then SIGKILL, whatever is left, by pid: the ``sub_start.sh`` watchdogs
           (which only sleep/clean up by then) first, then any straggler; remove stale
           ``*.fl`` pid/shutdown files so a later ``start()`` of this workspace is clean.
        ``clean_up=True`` additionally deletes the workspace (only once nothing runs).
        Raises RuntimeError if a process survives SIGKILL.
        """
        from nvflare.tool.api_utils import shutdown_system

        t0 = time.monotonic()
        self._session_manager = None
        procs = workspace_processes(self.workspace)
        if procs and self._provisioned and os.path.isfile(self.project_file):
            server_dir = self.site_dir(SERVER_NAME)
            shutdown_sent = False
            if _read_pid_file(os.path.join(server_dir, "pid.fl"), server_dir) is not None:
                try:
                    with self._env():
                        shutdown_system(self.prod_dir, username=self.username, wait=False, verbose=False)
                    shutdown_sent = True
                except Exception as e:  # graceful path failed: fall through to kill by pid
                    logger.warning("admin shutdown of POC %s failed: %s", self.workspace, e)
            deadline = time.monotonic() + (grace if shutdown_sent else 0.0)
            while time.monotonic() < deadline:
                if not [p for p, argv in workspace_processes(self.workspace).items() if _is_python(argv)]:
                    break
                time.sleep(0.25)
        left = terminate_workspace_processes(self.workspace) if workspace_processes(self.workspace) else []
        if self._provisioned and os.path.isdir(self.workspace):
            for name in self.participants:
                for fl in ("pid.fl", "daemon_pid.fl", "shutdown.fl", "restart.fl"):
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(self.site_dir(name), fl))
        if procs:
            self.timings["stop_s"] = time.monotonic() - t0
        if left:
            raise RuntimeError(f"POC processes survived SIGKILL: {left}")
        if clean_up and os.path.isdir(self.workspace):
            shutil.rmtree(self.workspace, ignore_errors=True)

    # ---------------------------------------------------------------- introspection
    def pids(self) -> dict[str, ParticipantPids]:
        """Live processes per participant (``"server"`` and each client), read from the
        startup kits' ``daemon_pid.fl`` / ``pid.fl`` and /proc (command line under the site dir)."""
        table = _process_table()
        prod = self.prod_dir
        out = {}
        for name in self.participants:
            site_dir = os.path.join(prod, name)
            daemon = _read_pid_file(os.path.join(site_dir, "daemon_pid.fl"), site_dir)
            main = _read_pid_file(os.path.join(site_dir, "pid.fl"), site_dir)
            roots = {p for p, (_, uid, argv) in table.items() if uid == os.getuid() and _refs_path(argv, site_dir)}
            roots |= {p for p in (daemon, main) if p is not None}
            every = _descendants(table, roots) & set(table)
            jobs = sorted(p for p, (ppid, _, argv) in table.items() if main and ppid == main and _is_python(argv))
            trainers = sorted(p for p in _descendants(table, set(jobs)) - set(jobs) if _is_python(table[p][2]))
            out[name] = ParticipantPids(name=name, daemon=daemon, main=main, jobs=jobs, trainers=trainers,
                                        all=sorted(every))
        return out

    def kill_site(self, site: str, sig: int = signal.SIGKILL, keep_down: bool = True) -> list[int]:
        """Kill ``site``'s FL processes by pid (simulates a site crash mid-round).

        ``keep_down=True`` first SIGKILLs the site's ``sub_start.sh`` watchdog, which would
        otherwise restart the client ~5 s later; then sends ``sig`` to the parent FL process
        and its job processes. Returns the pids signalled, once they are gone (up to 10 s for
        SIGKILL), so :meth:`start_participant` can start the site again right away.
        """
        p = self.pids()[site]
        signalled = []
        if keep_down and p.daemon:
            _signal_pids([p.daemon], signal.SIGKILL)
            signalled.append(p.daemon)
        targets = [q for q in p.all if q != p.daemon]  # FL parent, its job processes, watchdog's `sleep`
        _signal_pids(targets, sig)
        if sig == signal.SIGKILL:
            _wait_reaped(signalled + targets, 10.0)
        return signalled + targets

    def log_paths(self, job_id: Optional[str] = None) -> dict[str, dict[str, str]]:
        return poc_log_paths(self.workspace, job_id)


# ------------------------------------------------------------------- entry points


def make_poc_env(clients: Sequence[str], workspace: Union[str, Path], *, fed_learn_port: Optional[int] = None,
                 admin_port: Optional[int] = None, **kwargs: Any) -> IsolatedPocEnv:
    """Create (not start) an :class:`IsolatedPocEnv`; caller must ``stop()`` it (prefer :func:`isolated_poc`)."""
    return IsolatedPocEnv(clients, workspace, fed_learn_port=fed_learn_port, admin_port=admin_port, **kwargs)


@contextlib.contextmanager
def isolated_poc(clients: Sequence[str], workspace: Union[str, Path], *, start: bool = True,
                 clean_up: bool = False, **kwargs: Any) -> Iterator[IsolatedPocEnv]:
    """Provision (+ start) an isolated POC and guarantee it is stopped, with no leftover process.

    ``start=False`` yields a provisioned, not started env (write local files, then ``env.start()``
    or let ``recipe.execute(env)`` start it). Logs are kept unless ``clean_up=True``.
    """
    env = IsolatedPocEnv(clients, workspace, **kwargs)
    try:
        env.provision()
        if start:
            env.start()
        yield env
    finally:
        env.stop(clean_up=clean_up)


def run_job_in_poc(recipe, clients: Sequence[str], workspace: Union[str, Path], timeout: float = 600.0,
                   **kwargs: Any) -> tuple[Optional[str], Optional[str]]:
    """Run ``recipe`` in an isolated POC; returns ``(status, result_dir)`` and always stops the POC.

    ``status`` is the job status string (e.g. ``"FINISHED:COMPLETED"``), ``result_dir`` the
    downloaded job result (``<admin kit>/transfer/<job_id>``), or None if the job did not finish
    within ``timeout`` s (the job is then aborted by the shutdown). Logs stay in ``workspace``:
    see :func:`poc_log_paths` (job id = ``os.path.basename(result_dir)``).
    """
    with isolated_poc(clients, workspace, **kwargs) as env:
        run = recipe.run(env)
        result_dir = run.get_result(timeout=timeout, clean_up=False)
        status = run.get_status()
    return status, result_dir
