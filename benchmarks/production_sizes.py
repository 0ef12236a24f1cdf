"""Sizes a production deployment must plan for: bytes on the wire per round, FLoRA catch-up
payloads, and GPU memory of a 7B / 13B LoRA site.

    python benchmarks/production_sizes.py              # Llama-2-7B and -13B shapes
    python benchmarks/production_sizes.py --rank 8     # another site rank

Wire bytes are measured: a synthetic LoRA state of the real shapes goes through the controller's
``wire_bytes`` (FLARE's fobs encoding of the FLModel, tensors via safetensors), for one site's
update and for one stacked FLoRA round of ``--sites`` sites; a site catching up on R missed rounds
receives R such rounds. Memory is *computed* from the shapes (no GPU here), with the formulas
printed next to the table: weights at 4 / 2 / ~0.56 bytes per parameter (fp32, bf16, NF4 4-bit
with its quantisation constants), LoRA factors + their gradients + Adam moments in fp32 (16 bytes
per trainable parameter), and activations per decoder layer for one sequence in 16-bit of
s·h·34 bytes (flash/SDPA attention, Korthikanti et al. 2022) - all layers without gradient
checkpointing, one layer plus each layer's input with it.
"""

from __future__ import annotations

import argparse

import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.fuel.utils import fobs

from flare_lora.components.algorithms.lora_state import LORA_A_SUFFIX, LORA_B_SUFFIX
from flare_lora.components.flare.workflow import wire_bytes
from flare_lora.components.strategies import pack_rounds

MODELS = {  # name: (layers, hidden, intermediate, vocab, total params)
    "Llama-2-7B": (32, 4096, 11008, 32000, 6.74e9),
    "Llama-2-13B": (40, 5120, 13824, 32000, 13.0e9),
}
TARGETS = ("q_proj", "v_proj")


def lora_state(layers: int, hidden: int, rank: int) -> dict[str, torch.Tensor]:
    state = {}
    for layer in range(layers):
        for proj in TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            state[prefix + LORA_A_SUFFIX] = torch.zeros(rank, hidden)
            state[prefix + LORA_B_SUFFIX] = torch.zeros(hidden, rank)
    return state


def gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of every site")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--seq", type=int, default=2048, help="tokens per training sequence")
    args = p.parse_args()
    fobs.register(TensorDecomposer)

    print(f"LoRA rank {args.rank} on {'/'.join(TARGETS)}, {args.sites} sites; wire bytes measured with fobs\n")
    print(f"{'model':12} {'update MB':>10} {'round MB':>9} {'catch-up 10 rounds MB':>22}")
    for name, (layers, hidden, _, _, _) in MODELS.items():
        update = wire_bytes(FLModel(params=lora_state(layers, hidden, args.rank), params_type=ParamsType.FULL))
        stacked = lora_state(layers, hidden, args.rank * args.sites)  # one FLoRA round: ranks concatenated
        one_round = wire_bytes(FLModel(params=pack_rounds({0: stacked}), params_type=ParamsType.FULL))
        print(f"{name:12} {update / 1e6:10.1f} {one_round / 1e6:9.1f} {10 * one_round / 1e6:22.1f}")

    print(f"\nGPU memory per training process (GiB), one sequence of {args.seq} tokens, computed:")
    print(f"{'model':12} {'base fp32':>9} {'base bf16':>9} {'base 4-bit':>10} {'LoRA+Adam':>9} "
          f"{'act. no ckpt':>12} {'act. ckpt':>9} {'bf16+ckpt':>9} {'4-bit+ckpt':>10}")
    for name, (layers, hidden, _, vocab, total) in MODELS.items():
        trainable = layers * len(TARGETS) * 2 * hidden * args.rank
        lora = 16 * trainable
        per_layer = args.seq * hidden * 34  # 16-bit activations of one layer with flash/SDPA attention
        act_full = layers * per_layer
        act_ckpt = per_layer + layers * args.seq * hidden * 2
        logits = args.seq * vocab * 4  # worst case: fp32 logits of every position (flare-lora keeps answers only)
        bf16, nf4 = 2 * total, 0.56 * total
        print(f"{name:12} {gib(4 * total):>9} {gib(bf16):>9} {gib(nf4):>10} {gib(lora):>9} "
              f"{gib(act_full + logits):>12} {gib(act_ckpt + logits):>9} {gib(bf16 + lora + act_ckpt + logits):>9} "
              f"{gib(nf4 + lora + act_ckpt + logits):>10}")


if __name__ == "__main__":
    main()
