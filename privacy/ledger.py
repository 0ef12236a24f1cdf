"""A site's privacy spending: every noisy release as (noise multiplier, sample rate, steps), on disk.

ε is never stored, only recomputed with Opacus' accountant from the whole history, so releases
with different σ or q (rounds, jobs) compose correctly and RDP or PRV can be chosen later.

The ledger is an append-only journal (one JSON line per release) shared by every job and process
at the site: a charge takes the ledger's file lock, re-reads the journal (another job may have
charged meanwhile), checks the budget on the whole history and appends, so concurrent charges
are neither lost nor both let past the budget. A tally beside the ledger folder counts the
releases: a journal that disappeared or shrank after the site spent is an error, never an empty
budget. To start a site's budget again on purpose, its admin deletes both (docs/dp.md).
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flare_lora.components.optional import optional

accountants = optional("opacus.accountants")  # flare-lora[dp]: imported on first use

LEDGER_DIRNAME = "flare_lora_privacy"  # under the site's FLARE workspace

Release = tuple[float, float, int]  # (noise multiplier, sample rate, steps)


def epsilon(history: list[Release], delta: float, accountant: str = "rdp") -> float:
    """ε(δ) of the composed history with Opacus' accountant (0 for no release)."""
    if not history:
        return 0.0
    acc = accountants.create_accountant(mechanism=accountant)
    acc.history = _merge_runs(history)
    return float(acc.get_epsilon(delta=delta))


def _merge_runs(history: list[Release]) -> list[Release]:
    """Consecutive releases with one (σ, q) as one entry, as Opacus' own ``step()`` records them (a
    round is charged in blocks of 1, 1, 2, 4, ... steps): the same ε, in time independent of the
    number of ledger entries."""
    runs: list[Release] = []
    for s, q, n in history:
        s, q, n = float(s), float(q), int(n)
        if runs and runs[-1][:2] == (s, q):
            runs[-1] = (s, q, runs[-1][2] + n)
        else:
            runs.append((s, q, n))
    return runs


class PrivacyLedger:
    """Spending history of one kind of release at one site; ``path`` None keeps it in memory.
    ``tally``: the file that counts the releases, outside the ledger's folder (site_ledger)."""

    def __init__(self, path: str | None = None, tally: str | None = None):
        self.path, self.tally = path, tally
        self.entries: list[dict] = []
        if path:
            with self._locked():
                self.entries = self._read()

    @property
    def history(self) -> list[Release]:
        return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in self.entries]

    @property
    def steps(self) -> int:
        return sum(e["steps"] for e in self.entries)

    def epsilon(self, delta: float, accountant: str = "rdp", extra: Release | None = None) -> float:
        """ε spent so far, or after one more release ``extra`` = (σ, q, steps)."""
        return epsilon(self.history + ([extra] if extra else []), delta, accountant)

    def charge(self, noise_multiplier: float, sample_rate: float, steps: int,
               check: Callable[[list[Release]], None] | None = None, **note) -> None:
        """Record a release before it happens (a crash can over-count, never under-count), in one
        step with its budget check: ``check(history including this release)`` raises to refuse."""
        release = (float(noise_multiplier), float(sample_rate), int(steps))
        entry = {"noise_multiplier": release[0], "sample_rate": release[1], "steps": release[2],
                 "time": time.time(), **note}
        if not self.path:
            if check:
                check(self.history + [release])
            self.entries.append(entry)
            return
        with self._locked():
            self.entries = self._read()
            if check:
                check(self.history + [release])
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:  # one write of one line: appended whole
                os.write(fd, (json.dumps(entry, default=str) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            self.entries.append(entry)
            if self.tally:
                _write_atomically(self.tally, str(len(self.entries)))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            yield

    def _read(self) -> list[dict]:
        recorded = _read_tally(self.tally)
        self._import_legacy()
        entries = []
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        entry = json.loads(line)
                        float(entry["noise_multiplier"]), float(entry["sample_rate"]), int(entry["steps"])
                    except (ValueError, KeyError, TypeError) as e:
                        raise ValueError(f"privacy ledger {self.path}:{number}: unreadable ({e}); refusing to start "
                                         "from an empty budget") from e
                    entries.append(entry)
        if len(entries) < recorded:
            raise ValueError(f"privacy ledger {self.path}: holds {len(entries)} release(s) but {self.tally} counts "
                             f"{recorded} at this site; refusing to start from a smaller budget (to reset the site's "
                             "budget on purpose, its admin deletes both files: docs/dp.md)")
        return entries


    def _import_legacy(self) -> None:
        """Carry over the ledger an earlier flare-lora wrote (``<name>.json``: {"entries": [...]}) when
        this journal does not exist yet, so an upgrade never restarts a site's budget at zero. The
        old file stays as it was."""
        legacy = self.path[: -len(".jsonl")] + ".json" if self.path.endswith(".jsonl") else None
        if not legacy or not os.path.exists(legacy) or os.path.exists(self.path):
            return
        try:
            with open(legacy, encoding="utf-8") as f:
                old = list(json.load(f)["entries"])
            lines = [json.dumps({**e, "noise_multiplier": float(e["noise_multiplier"]),
                                 "sample_rate": float(e["sample_rate"]), "steps": int(e["steps"]),
                                 "imported_from": legacy}, default=str) + "\n" for e in old]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"privacy ledger {legacy} (an earlier version's): unreadable ({e}); refusing to start "
                             f"{self.path} from an empty budget") from e
        _write_atomically(self.path, "".join(lines))


def site_ledger(root: str | None, name: str) -> PrivacyLedger:
    """The site's ledger ``name`` in its FLARE workspace ``root`` (in memory when None), with its
    tally in ``root`` itself, outside the ledger folder."""
    if not root:
        return PrivacyLedger()
    return PrivacyLedger(os.path.join(root, LEDGER_DIRNAME, name), tally=os.path.join(root, f".{LEDGER_DIRNAME}_{name}.count"))


def _read_tally(path: str | None) -> int:
    if not path or not os.path.exists(path):
        return 0
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError) as e:
        raise ValueError(f"privacy ledger tally {path}: unreadable ({e}); refusing to start from an empty budget") from e


def _write_atomically(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tally-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


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

