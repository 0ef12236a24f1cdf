"""Test support for the isolated POC (components/flare/poc.py): its every process, crashing a site.

:class:`HarnessPocEnv` is the runtime :class:`IsolatedPocEnv` plus what only tests need. It finds
every process of its workspace in the process table (/proc: the FL processes, their job processes,
the trainers those launched), so its stop() ends them all even after a test killed their parent,
and tests can assert that nothing is left. It lists each participant's processes, kills a site by
pid (as a crash would) and starts it again, adds environment, and times its steps.

    with isolated_poc(["site-1", "site-2"], tmp_path / "poc", home=tmp_path / "home") as env:
        run = recipe.run(env)
        env.kill_site("site-2")             # SIGKILL site-2 (and keep it down)
        result_dir = run.get_result(timeout=300, clean_up=False)
    assert workspace_processes(tmp_path / "poc") == {}
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from flare_lora.components.flare.poc import IsolatedPocEnv
from flare_lora.components.flare.poc_processes import refers_to, signal_pids, site_pid
from flare_lora.components.flare.poc_project import poc_prod_dir

ProcTable = Mapping[int, tuple[int, int, list[str]]]  # pid -> (ppid, uid, argv)


@dataclass
class ParticipantPids:
    """Processes of one POC participant (server or client)."""

    name: str
    daemon: Optional[int] = None  # the sub_start.sh watchdog loop (restarts `main` if it dies)
    main: Optional[int] = None  # the parent FL process (server_train / client_train)
    jobs: list[int] = field(default_factory=list)  # job processes (children of `main`)
    trainers: list[int] = field(default_factory=list)  # what the job processes launched (client scripts)
    all: list[int] = field(default_factory=list)  # every live process of this participant


def _read_proc(pid: int) -> Optional[tuple[int, int, list[str]]]:
    """(ppid, uid, argv) of a live pid, or None (gone or a zombie)."""
    try:
        argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
        state, ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]  # comm may hold ")"
        uid = os.stat(f"/proc/{pid}").st_uid
    except (OSError, ValueError, IndexError):
        return None
    return None if state == "Z" else (int(ppid), uid, argv)


def _process_table() -> dict[int, tuple[int, int, list[str]]]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _read_proc(int(entry))
            if info is not None:
                table[int(entry)] = info
    return table


def _descendants(table: ProcTable, roots: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = set(), list(roots)
    while stack:
        pid = stack.pop()
        if pid not in out:
            out.add(pid)
            stack.extend(children.get(pid, []))
    return out


def _ancestors(table: ProcTable, pid: int) -> set[int]:
    out: set[int] = set()
    while pid > 0 and pid not in out:
        out.add(pid)
        info = table.get(pid)
        if info is None:
            break
        pid = info[0]
    return out


def workspace_processes(workspace: Union[str, Path]) -> dict[int, list[str]]:
    """Live processes of this uid whose command line names ``workspace``, and their descendants.

    The POC watchdogs, FL parents and job processes all carry their startup kit's path (under the
    workspace) on their command line; the caller and what launched it are left out.
    """
    roots = {os.path.abspath(str(workspace)), os.path.realpath(str(workspace))}
    me = os.getuid()
    table = _process_table()
    own = _ancestors(table, os.getpid())
    matched = {pid for pid, (_, uid, argv) in table.items()
               if uid == me and pid not in own and any(refers_to(argv, r) for r in roots)}
    pids = _descendants(table, matched) - own
    return {pid: table[pid][2] for pid in sorted(pids) if pid in table and table[pid][1] == me}


def _is_python(argv: Sequence[str]) -> bool:
    return bool(argv) and "python" in os.path.basename(argv[0])


def _wait_reaped(pids: Sequence[int], timeout: float) -> None:
    """Wait until ``pids`` no longer exist, zombies included (a watchdog's ``kill -0`` sees those)."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except (ProcessLookupError, PermissionError):  # gone (or the pid now is another user's)
                break
            time.sleep(0.1)


def poc_log_paths(workspace: Union[str, Path], job_id: Optional[str] = None) -> dict[str, dict[str, str]]:
    """The existing log files of the server and each client (also after the POC stopped).

    Per participant: ``console`` (the service's stdout/stderr), ``log`` (``log.txt``), ``error_log``
    (``log_error.txt``) and, with ``job_id``, ``job_log`` / ``job_error_log`` of that job.
    """
    import yaml

    prod = poc_prod_dir(workspace)
    project = yaml.safe_load(Path(os.path.abspath(str(workspace)), "project.yml").read_text())
    out: dict[str, dict[str, str]] = {}
    for name in [p["name"] for p in project["participants"] if p["type"] in ("server", "client")]:
        files = {"console": "poc_console.log", "log": "log.txt", "error_log": "log_error.txt"}
        if job_id:
            files.update(job_log=os.path.join(job_id, "log.txt"), job_error_log=os.path.join(job_id, "log_error.txt"))
        paths = {k: os.path.join(prod, name, f) for k, f in files.items()}
        out[name] = {k: path for k, path in paths.items() if os.path.isfile(path)}
    return out


class HarnessPocEnv(IsolatedPocEnv):
    """:class:`IsolatedPocEnv` that owns every process of its workspace; ``extra_env`` is added to
    the environment of the nvflare calls and POC processes; ``timings`` holds each step's seconds."""

    def __init__(self, clients: Sequence[str], workspace: Union[str, Path], *,
                 extra_env: Optional[Mapping[str, str]] = None, **kwargs: Any):
        self.extra_env = dict(extra_env or {})
        self.timings: dict[str, float] = {}
        self._submitted_at: Optional[float] = None
        super().__init__(clients, workspace, **kwargs)

    def environ(self) -> dict[str, str]:
        return {**super().environ(), **self.extra_env}

    def live_processes(self) -> dict[int, bool]:
        """Every process of the workspace, pid -> whether it is a python (FL) process."""
        return {pid: _is_python(argv) for pid, argv in workspace_processes(self.workspace).items()}

    @contextlib.contextmanager
    def _timed(self, step: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.timings[step] = time.monotonic() - t0

    def provision(self) -> str:
        with self._timed("provision_s"):
            return super().provision()

    def start(self) -> None:
        with self._timed("start_s"):
            super().start()

    def deploy(self, job) -> str:
        with self._timed("submit_s"):
            job_id = super().deploy(job)
        self._submitted_at = time.monotonic()
        return job_id

    def get_job_result(self, job_id: str, timeout: float = 0.0) -> Optional[str]:
        result = super().get_job_result(job_id, timeout)
        if self._submitted_at is not None:
            self.timings["job_s"] = time.monotonic() - self._submitted_at
        return result

    def stop(self, clean_up: bool = False, grace: float = 20.0) -> None:
        with self._timed("stop_s"):
            super().stop(clean_up, grace)

    def start_participant(self, name: str) -> None:
        """(Re)start one participant, e.g. after :meth:`kill_site` (``nvflare poc start -p <name>``)."""
        if name not in self.participants:
            raise ValueError(f"unknown participant {name!r}; expected one of {self.participants}")
        self._start_services([name])

    def pids(self) -> dict[str, ParticipantPids]:
        """Live processes per participant, from its pid files and /proc (command line under its directory)."""
        table = _process_table()
        out = {}
        for name in self.participants:
            site_dir = self.site_dir(name)
            daemon = site_pid(os.path.join(site_dir, "daemon_pid.fl"), site_dir)
            main = site_pid(os.path.join(site_dir, "pid.fl"), site_dir)
            roots = {p for p, (_, uid, argv) in table.items() if uid == os.getuid() and refers_to(argv, site_dir)}
            roots |= {p for p in (daemon, main) if p is not None}
            every = _descendants(table, roots) & set(table)
            jobs = sorted(p for p, (ppid, _, argv) in table.items() if main and ppid == main and _is_python(argv))
            trainers = sorted(p for p in _descendants(table, set(jobs)) - set(jobs) if _is_python(table[p][2]))
            out[name] = ParticipantPids(name=name, daemon=daemon, main=main, jobs=jobs, trainers=trainers,
                                        all=sorted(every))
        return out

    def kill_site(self, site: str, sig: int = signal.SIGKILL, keep_down: bool = True) -> list[int]:
        """Kill ``site``'s FL processes by pid (a site crash mid-round); the pids signalled.

        ``keep_down=True`` first SIGKILLs the site's watchdog, which would restart it ~5 s later.
        With SIGKILL, returns once the pids are gone, so :meth:`start_participant` can follow.
        """
        p = self.pids()[site]
        signalled = []
        if keep_down and p.daemon:
            signal_pids([p.daemon], signal.SIGKILL)
            signalled.append(p.daemon)
        targets = [q for q in p.all if q != p.daemon]  # FL parent, its job processes, the watchdog's `sleep`
        signal_pids(targets, sig)
        if sig == signal.SIGKILL:
            _wait_reaped(signalled + targets, 10.0)
        return signalled + targets

    def log_paths(self, job_id: Optional[str] = None) -> dict[str, dict[str, str]]:
        return poc_log_paths(self.workspace, job_id)


@contextlib.contextmanager
def isolated_poc(clients: Sequence[str], workspace: Union[str, Path], *, start: bool = True,
                 clean_up: bool = False, **kwargs: Any) -> Iterator[HarnessPocEnv]:
    """A provisioned (and, unless ``start=False``, started) POC, always stopped with nothing left."""
    env = HarnessPocEnv(clients, workspace, **kwargs)
    try:
        env.provision()
        if start:
            env.start()
        yield env
    finally:
        env.stop(clean_up=clean_up)


def run_job_in_poc(recipe, clients: Sequence[str], workspace: Union[str, Path], timeout: float = 600.0,
                   **kwargs: Any) -> tuple[Optional[str], Optional[str]]:
    """Run ``recipe`` in an isolated POC: (job status, downloaded result dir or None after ``timeout``
    s). The POC is always stopped; its logs stay (:func:`poc_log_paths`, job id = the result dir's name)."""
    with isolated_poc(clients, workspace, **kwargs) as env:
        run = recipe.run(env)
        result_dir = run.get_result(timeout=timeout, clean_up=False)
        status = run.get_status()
    return status, result_dir
