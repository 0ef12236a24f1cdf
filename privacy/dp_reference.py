"""Where a site's local training started, derived by the client-level DP filter itself.

Client-level DP releases reference + clip(result − reference) + noise (privacy/client_dp.py). That
is private only if the reference does not depend on the site's data, so nothing the job's code
writes may move it: the filter derives it from what the server sent and from a seed it hands out.

- ``ReceivedView``: per job, the latest value of every tensor the server sent (what a site installs;
  selective-layer tasks send only layers that changed, so one task alone is not enough).
- ``init_seed`` (components/algorithms/lora_init.py): the seed of every fresh adapter in a round, from the job id and the round (the same
  at every site of the job: averaging methods need one shared start). The filter writes it into the
  task; flare-lora's client script draws its fresh adapters from it (lora_init.py).
- ``derive_reference``: per result entry, by the method the task names (the server's word is
  data-independent, which is all DP needs): FLoRA: the fresh adapter; FedIT: the received global;
  zero-pad / hlora / FedCDD: the site's slice A_g[:r], B_g[:, :r]/s; selective layers and full weights: the
  received values (LoRA layers never sent: the fresh adapter); any other job: the received global.

Pure torch; the FLARE filter is privacy/flare/client_dp_filter.py.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor

from flare_lora.components.algorithms.lora_init import fresh_factor
from flare_lora.components.algorithms.lora_state import LORA_A_SUFFIX, LORA_B_SUFFIX

INIT_SEED_KEY = "client_dp_init_seed"  # task meta entry the filter adds; the client script reads it
SLICING_METHODS = ("zero_pad", "hlora", "fedcdd")  # a site of rank r installs A_g[:r], B_g[:, :r] / s
FRESH_METHODS = ("flora", "shared_a")  # a fresh adapter every round; the received rounds are merged into the base


class ReceivedView:
    """The latest received value of every tensor, per job (the ``jobs`` most recent jobs)."""

    def __init__(self, jobs: int = 4):
        self.jobs = jobs
        self._views: OrderedDict[str, dict[str, Tensor]] = OrderedDict()

    def update(self, job_id: str, tensors: dict[str, Tensor]) -> None:
        """Record a task's tensors (copies: an in-process trainer may change them in place); FLoRA's
        ``r<round>/`` catch-up entries are merged into the base, never trained from: not kept."""
        view = self._views.setdefault(job_id, {})
        self._views.move_to_end(job_id)
        for key, value in tensors.items():
            if "/" not in key:
                view[key] = value.detach().to("cpu", copy=True)
        while len(self._views) > self.jobs:
            self._views.popitem(last=False)

    def get(self, job_id: str) -> dict[str, Tensor]:
        return self._views.get(job_id, {})


def expected_layout(method: str | None, received: dict[str, Tensor], modules, rank) -> dict[str, tuple] | None:
    """{key: shape} a result must have, from the server's word alone (the task's ``modules`` =
    [[prefix, out, in], ...] and this site's ``rank``, and what it sent); None where that does not
    fix it (selective layers: their keys follow the layers the task assigns)."""
    fresh = None
    if isinstance(modules, list) and isinstance(rank, int) and rank > 0:
        fresh = {}
        for prefix, out, in_dim in modules:
            fresh[prefix + LORA_A_SUFFIX], fresh[prefix + LORA_B_SUFFIX] = (rank, in_dim), (out, rank)
    if method == "shared_a" and fresh is not None:  # A is the round's shared draw, not the site's: B only
        return {k: v for k, v in fresh.items() if k.endswith(LORA_B_SUFFIX)}
    if method in FRESH_METHODS or (method is not None and method != "selective" and not received and fresh):
        return fresh
    if method == "selective" or not received:
        return None
    if method in SLICING_METHODS and fresh is not None:
        return {k: fresh.get(k, tuple(v.shape)) for k, v in received.items()}
    return {k: tuple(v.shape) for k, v in received.items()}


def _slice(key: str, value: Tensor, shape: tuple, scaling: float | None) -> Tensor:
    """A site's slice of a global factor of a larger or equal rank."""
    if key.endswith(LORA_A_SUFFIX) and value.shape[1:] == shape[1:] and shape[0] <= value.shape[0]:
        return value[: shape[0]]
    if key.endswith(LORA_B_SUFFIX) and value.shape[0] == shape[0] and shape[1] <= value.shape[1]:
        if scaling is None:
            raise ValueError(f"{key}: the site's LoRA scaling (alpha / rank) is unknown")
        return value[:, : shape[1]] / scaling
    raise ValueError(f"{key}: shape {shape} is not a slice of the received {tuple(value.shape)}")


def derive_reference(shapes: dict[str, tuple], received: dict[str, Tensor], method: str | None,
                     seed: int | None, scaling: float | None = None) -> dict[str, Tensor]:
    """{key: reference tensor (float32)} for a result with entries of ``shapes``; ValueError naming the
    first entry whose start cannot be derived without the job's word."""
    reference = {}
    for key, shape in shapes.items():
        shape = tuple(shape)
        value = None if method in FRESH_METHODS else received.get(key)
        if value is not None and method in SLICING_METHODS:
            value = _slice(key, value.float(), shape, scaling)
        elif value is None and method is not None and seed is not None:
            value = fresh_factor(seed, key, shape)  # a LoRA factor trained from its fresh init
        if value is None:
            raise ValueError(f"result entry {key!r} was never sent by the server, so where training started "
                             "is unknown")
        if tuple(value.shape) != shape:
            raise ValueError(f"result entry {key!r}: shape {shape}, but it started from {tuple(value.shape)}")
        reference[key] = value.float()
    return reference
