"""Several training processes per site: torchrun + DistributedDataParallel behind one FLARE client.

FLARE starts the site's client script with ``command="torchrun --standalone --nproc_per_node=N"``.
Only rank 0 holds a Client API session (NVFlare's Cell API makes other ranks passive), so rank 0
receives each task and broadcasts it; every rank installs the same global state (FLoRA merges it
into identical base weights), trains on its own shard of the site's records with gradients
averaged by DDP, and rank 0 evaluates and sends the result. Without torchrun (``WORLD_SIZE``
unset or 1) the same code runs as one process and no collective is issued.

Control messages (tasks) go through a gloo group with a long timeout even on GPUs: ranks > 0 wait
in a broadcast for the next task while the server waits for the other sites, which can take far
longer than NCCL's default watchdog allows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from flare_lora.components.strategies import SharedA
from flare_lora.privacy.dp_reference import INIT_SEED_KEY

CONTROL_TIMEOUT = timedelta(days=7)  # a rank > 0 may wait this long for the site's next task


@dataclass
class Task:
    """What every rank needs of one FLARE task."""

    params: dict
    current_round: int
    train: bool
    init_seed: int | None = None  # the round's fresh-adapter seed a client-DP filter handed out
    shared_a_key: str | None = None  # shared-A: the key of the rounds' A seeds, the server's word


class SiteGroup:
    """The processes of one site: ``world`` ranks, rank 0 talks to FLARE; rank r uses GPU r if any."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", self.local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        self._control = None
        if self.world > 1:
            dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=None if cuda else CONTROL_TIMEOUT)
            self._control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT) if cuda else dist.group.WORLD

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (picklable objects; tensors travel via CPU)."""
        if self.world == 1:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def check_same(self, value: Any, what: str) -> None:
        """Fail loudly unless every rank holds the same ``value`` (e.g. a weights digest)."""
        if self.world == 1:
            return
        values = [None] * self.world
        dist.all_gather_object(values, value, group=self._control)
        if len(set(values)) > 1:
            raise RuntimeError(f"{what} differ across the site's DDP ranks: {values}")

    def tasks(self, flare) -> Iterator[Task]:
        """The site's FLARE tasks, on every rank; ends on every rank when FLARE stops the job."""
        while True:
            task = None
            if self.is_main and flare.is_running():
                received = flare.receive()
                if received is not None:
                    meta = received.meta or {}
                    seed, key = meta.get(INIT_SEED_KEY), meta.get(SharedA.TASK_KEY)
                    task = Task(dict(received.params or {}), received.current_round or 0, flare.is_train(),
                                seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
                                key if isinstance(key, str) else None)
            task = self.share(task)
            if task is None:
                return
            yield task

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to train (already on ``self.device``): DDP over the site's ranks, else itself."""
        if self.world == 1:
            return model
        device_ids = [self.local_rank] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def shard(self, records: Sequence) -> list:
        """This rank's share of the site's training records (every rank gets at least one)."""
        if self.world == 1:
            return list(records)
        if len(records) < self.world:
            raise ValueError(f"{len(records)} training records cannot feed {self.world} DDP processes")
        return list(records[self.rank :: self.world])

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
