"""A site's privacy spending: every noisy release as (noise multiplier, sample rate, steps), on disk.

ε is never stored, only recomputed with Opacus' accountant from the whole history, so releases
with different σ or q (rounds, jobs) compose correctly and RDP or PRV can be chosen later. The file
is rewritten atomically after every charge; a site that restarts — or runs another job on the same
data — starts from what it already spent. A damaged file is an error, never an empty budget.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from opacus.accountants import create_accountant

LEDGER_DIRNAME = "flare_lora_privacy"  # under the site's FLARE workspace


def epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """ε(δ) of the composed history with Opacus' accountant (0 for no release)."""
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


class PrivacyLedger:
    """Spending history of one kind of release at one site; ``path`` None keeps it in memory."""

    def __init__(self, path: str | None = None):
        self.path = path
        self.entries: list[dict] = []
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    self.entries = list(json.load(f)["entries"])
                for e in self.entries:
                    float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"privacy ledger {path}: unreadable ({e}); refusing to start from an empty budget") from e

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in self.entries]

    @property
    def steps(self) -> int:
        return sum(e["steps"] for e in self.entries)

    def epsilon(self, delta: float, accountant: str = "rdp", extra: tuple[float, float, int] | None = None) -> float:
        """ε spent so far, or after one more release ``extra`` = (σ, q, steps)."""
        return epsilon(self.history + ([extra] if extra else []), delta, accountant)

    def charge(self, noise_multiplier: float, sample_rate: float, steps: int, **note) -> None:
        """Record a release (before it happens: a crash can over-count, never under-count)."""
        self.entries.append({"noise_multiplier": float(noise_multiplier), "sample_rate": float(sample_rate),
                             "steps": int(steps), "time": time.time(), **note})
        if not self.path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(self.path)), prefix=".ledger-")
        with os.fdopen(fd, "w") as f:
            json.dump({"entries": self.entries}, f, indent=1, default=str)
        os.replace(tmp, self.path)


def site_root(start: str | None = None, job_id: str | None = None) -> str | None:
    """The FLARE site workspace (the folder holding ``startup/`` and ``local/``) at or above ``start``.

    A client script runs in ``<site>/<job id>/app_<site>`` (external process) or in ``<site>``
    (in-process); None outside FLARE. With ``job_id``, inside the job's run folder the root is the
    folder holding ``<job id>``: the job's own app folders (which the job ships) cannot pose as the
    site's kit with a ``startup/`` and ``local/`` of their own.
    """
    path = os.path.abspath(start or os.getcwd())
    if job_id:
        parts = path.split(os.sep)
        if job_id in parts:
            path = os.sep.join(parts[:parts.index(job_id)]) or os.sep
    while True:
        if os.path.isdir(os.path.join(path, "startup")) and os.path.isdir(os.path.join(path, "local")):
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def ledger_path(root: str | None, name: str) -> str | None:
    return os.path.join(root, LEDGER_DIRNAME, name) if root else None
