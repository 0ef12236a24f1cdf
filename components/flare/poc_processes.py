"""The processes of a POC, found by FLARE's pid files and stopped by pid, never by name.

Each participant's directory holds ``daemon_pid.fl`` (its ``sub_start.sh`` watchdog, which restarts
the FL process when it dies) and ``pid.fl`` (the FL parent process). A pid file can outlive its
process and its pid be reused, so a pid counts only while it is alive, ours and runs from that
directory.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

logger = logging.getLogger(__name__)

PID_FILES = {"daemon_pid.fl": False, "pid.fl": True}  # name -> whether it names an FL process
FL_FILES = (*PID_FILES, "shutdown.fl", "restart.fl")  # what a stopped participant leaves behind


def refers_to(argv: Sequence[str], root: str) -> bool:
    """Whether a command line names ``root`` or a path under it (also as ``--opt=/path``)."""
    root = root.rstrip("/")
    return any(t == root or t.startswith(root + "/") for arg in argv for t in arg.split("="))


def site_pid(path: str, site_dir: str) -> Optional[int]:
    """The pid in the pid file ``path`` if that process is alive, ours and runs from ``site_dir``."""
    try:
        pid = int(Path(path).read_text().strip())
        if os.stat(f"/proc/{pid}").st_uid != os.getuid():
            return None
        argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except (OSError, ValueError):
        return None
    return pid if refers_to(argv, site_dir) else None  # a zombie's command line is empty


def site_pids(site_dir: str) -> dict[int, bool]:
    """The live processes the pid files of one participant name, pid -> whether it is an FL process."""
    pids = {name: site_pid(os.path.join(site_dir, name), site_dir) for name in PID_FILES}
    return {pid: PID_FILES[name] for name, pid in pids.items() if pid is not None}


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def signal_pids(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            logger.warning("no permission to signal pid %s", pid)


def terminate(live: Callable[[], dict[int, bool]], timeout: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL, what ``live()`` names (pid -> is an FL process), watchdogs first so they
    cannot restart an FL process; returns the pids ``live()`` still names after."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = live()
        signal_pids(sorted(pids, key=pids.get), sig)  # False (watchdog) sorts first
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.2)
    return sorted(live())
