"""Durable server state of a federated LoRA job, so a job interrupted between rounds can resume.

NVFlare 2.9 no longer snapshots workflow components (``ServerEngine.persist_components`` is a
no-op and nothing calls ``restore_running_job``): after a server restart the running job is gone.
The controller therefore writes its own state after every round, and the operator resubmits the
same job, which continues at the next round with the same global state.

Layout of a checkpoint directory (no nvflare import; plain files any tool can read)::

    round-0000.safetensors   the aggregated global state of round 0 (written once, never changed)
    round-0001.safetensors   ...
    state.json               which rounds are complete, the job identity, the per-round log,
                             the sampling RNG and the strategy's own state; replaced atomically
                             *after* the round file, so a crash mid-write leaves the previous
                             round's consistent state.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from safetensors.torch import load_file, save_file
from torch import Tensor

FORMAT = 1
STATE_FILE = "state.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed by this job; the message names the file and key."""


@dataclass
class Resumed:
    rounds: list[dict[str, Tensor]]  # one aggregated global state per completed round
    records: list[dict]  # the controller's per-round log records of those rounds
    extra: dict = field(default_factory=dict)  # controller state: rng, strategy scaling, ...


def _plain(value):
    """JSON round trip, so tuples/lists and int/float keys compare as they will after loading."""
    return json.loads(json.dumps(value, default=str))


def round_file(index: int) -> str:
    return f"round-{index:04d}.safetensors"


class RoundCheckpoint:
    """Append-only per-round checkpoint of one job in ``directory`` (server-local path)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.state_path = os.path.join(directory, STATE_FILE)

    def exists(self) -> bool:
        return os.path.isfile(self.state_path)

    def load(self, identity: Mapping) -> Resumed:
        """The completed rounds, if the checkpoint belongs to a job with the same ``identity``.

        ``identity`` holds what makes the saved global state meaningful for this job (method and
        its options, the sites' declared ranks/alphas, the base model); ``num_rounds`` may differ,
        so a finished job can be continued for more rounds.
        """
        try:
            with open(self.state_path) as f:
                state = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"checkpoint {self.state_path}: unreadable: {e}") from e
        if state.get("format") != FORMAT:
            raise CheckpointError(
                f"checkpoint {self.state_path}: key 'format': expected {FORMAT}, got {state.get('format')!r}"
            )
        saved = state.get("identity", {})
        for key in sorted(set(identity) | set(saved)):
            if _plain(identity.get(key)) != saved.get(key):
                raise CheckpointError(
                    f"checkpoint {self.state_path}: key {key!r}: expected {_plain(identity.get(key))!r} "
                    f"(this job), got {saved.get(key)!r}; use another checkpoint_dir for a different job"
                )
        done = state["rounds_done"]
        rounds = []
        for index in range(done):
            path = os.path.join(self.directory, round_file(index))
            if not os.path.isfile(path):
                raise CheckpointError(f"checkpoint {self.state_path}: round {index} file missing: {path}")
            rounds.append(load_file(path))
        records = state.get("records", [])
        if len(records) != done:
            raise CheckpointError(
                f"checkpoint {self.state_path}: key 'records': expected {done} round records, got {len(records)}"
            )
        return Resumed(rounds=rounds, records=records, extra=state.get("extra", {}))

    def save(self, identity: Mapping, rounds: Sequence[Mapping[str, Tensor]], records: Sequence[dict],
             extra: Mapping | None = None) -> None:
        """Record ``len(rounds)`` completed rounds. Round files already on disk are not rewritten."""
        os.makedirs(self.directory, exist_ok=True)
        done = self._rounds_done()
        for index in range(done, len(rounds)):
            path = os.path.join(self.directory, round_file(index))
            tmp = path + ".tmp"
            save_file({k: v.contiguous() for k, v in rounds[index].items()}, tmp)
            os.replace(tmp, path)
        state = {
            "format": FORMAT,
            "identity": _plain(dict(identity)),
            "rounds_done": len(rounds),
            "records": _plain(list(records)),
            "extra": _plain(dict(extra or {})),
        }
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1, default=str)
        os.replace(tmp, self.state_path)

    def _rounds_done(self) -> int:
        """Rounds whose files were written by a consistent earlier save (0 if none)."""
        if not self.exists():
            return 0
        try:
            with open(self.state_path) as f:
                return int(json.load(f).get("rounds_done", 0))
        except (OSError, ValueError):
            return 0
