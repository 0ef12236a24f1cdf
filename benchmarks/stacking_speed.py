"""Is FLoRA stacking memory-bound? Times stack_lora against a memcpy of the same output bytes.

Stacking is pure data movement, so its floor is one copy of the stacked update: the goal is
stack/memcpy <= 2.0, with a naive torch.cat of scaled temporaries for reference. Also measures
how much the wire formats add to the raw tensor bytes of one site's update.

    python benchmarks/stacking_speed.py            # Llama-7B q/v: 32 layers, in=out=4096
    python benchmarks/stacking_speed.py --quick    # small shapes, a smoke run

The memcpy writes into a preallocated buffer, while stack_lora returns fresh tensors. glibc hands
freed blocks back to the OS, so each call may first-touch its ~336 MB again (~82k page faults);
to time the copy work alone, keep freed memory in the process:

    MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_MMAP_THRESHOLD_=33554432 python benchmarks/...

On a machine shared with other busy processes, --threads 1 avoids OpenMP barrier stalls: every
per-site copy is its own parallel region, so one descheduled worker thread stalls each of them.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from collections.abc import Callable

import torch
from safetensors.torch import save as safetensors_save

from flare_lora.components.algorithms.lora_state import LORA_A_SUFFIX, LORA_B_SUFFIX
from flare_lora.components.algorithms.stacking import stack_lora

RANKS = (64, 32, 16, 16, 8, 8, 4, 4, 4, 4)


def make_site(rank: int, layers: int, dim: int) -> dict[str, torch.Tensor]:
    state = {}
    for layer in range(layers):
        for proj in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            state[prefix + LORA_A_SUFFIX] = torch.randn(rank, dim)
            state[prefix + LORA_B_SUFFIX] = torch.randn(dim, rank)
    return state


def naive_stack(states, weights, scalings) -> dict[str, torch.Tensor]:
    """Reference: torch.cat of scaled temporaries, module by module."""
    total = sum(weights)
    coefs = [w / total * s for w, s in zip(weights, scalings, strict=True)]
    out = {}
    for a_key in (k for k in states[0] if k.endswith(LORA_A_SUFFIX)):
        b_key = a_key[: -len(LORA_A_SUFFIX)] + LORA_B_SUFFIX
        out[a_key] = torch.cat([c * st[a_key] for c, st in zip(coefs, states, strict=True)])
        out[b_key] = torch.cat([st[b_key] for st in states], dim=1)
    return out


def flarewire_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of a site's result message as FLARE serialises it (the controller's own accounting)."""
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.app_opt.pt.decomposers import TensorDecomposer
    from nvflare.fuel.utils import fobs

    from flare_lora.components.flare.workflow import wire_bytes

    fobs.register(TensorDecomposer)
    meta = {"num_examples": 1000, "rank": 16, "alpha": 32.0, "merged_rounds": 3, "base_digest": "0" * 64}
    return wire_bytes(FLModel(params=state, params_type=ParamsType.FULL, meta=meta, metrics={"eval_loss": 1.0}))


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds per function; one call of each per repetition, so that load from other
    processes on a shared machine hits all of them alike. Results are freed between calls."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(reps + 1):  # repetition 0 is the warm-up
        for name, fn in fns.items():
            start = time.perf_counter()
            result = fn()
            elapsed = time.perf_counter() - start
            del result
            if rep:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 layers, dim 512")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers, dim = (4, 512) if args.quick else (32, 4096)

    states = [make_site(r, layers, dim) for r in RANKS]
    weights = [float(100 + 37 * k) for k in range(len(RANKS))]
    scalings = [16.0 / r for r in RANKS]
    out_numel = 2 * 2 * layers * sum(RANKS) * dim
    src = torch.ones(out_numel)
    dst = torch.empty_like(src)

    medians = interleaved_medians(
        {
            "stack_lora": lambda: stack_lora(states, weights, scalings),
            "memcpy": lambda: dst.copy_(src),
            "clone": lambda: src.clone(),
            "naive cat": lambda: naive_stack(states, weights, scalings),
        },
        args.reps,
    )
    print(f"shapes: {2 * layers} modules, in=out={dim}, ranks {RANKS}, threads {args.threads}")
    print(f"stacked output: {out_numel * 4 / 1e6:.1f} MB fp32, median of {args.reps} reps")
    for name, seconds in medians.items():
        print(f"{name:<10} {seconds * 1e3:8.2f} ms")
    print(
        f"stack/memcpy {medians['stack_lora'] / medians['memcpy']:.2f} (goal <= 2.0), "
        f"naive/memcpy {medians['naive cat'] / medians['memcpy']:.2f}; against a copy into fresh memory "
        f"(clone, which pays the same page faults as any new output): stack/clone "
        f"{medians['stack_lora'] / medians['clone']:.2f}, naive/clone {medians['naive cat'] / medians['clone']:.2f}"
    )

    site = states[RANKS.index(16)]
    raw = sum(t.numel() * t.element_size() for t in site.values())
    buffer = io.BytesIO()
    torch.save(site, buffer)
    print(
        f"wire, rank-16 site ({raw / 1e6:.2f} MB raw): FLARE message {flarewire_bytes(site) / raw:.4f}x "
        f"(goal <= 1.05), safetensors {len(safetensors_save(site)) / raw:.4f}x, "
        f"torch.save {buffer.getbuffer().nbytes / raw:.4f}x"
    )


if __name__ == "__main__":
    main()
