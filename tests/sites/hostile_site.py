"""A hostile site: round after round it sends another kind of bad LoRA result (ATTACKS, in order).

Each result is built to get past a naive server: the right keys where it matters, finite values
where a finite check is all there is. It speaks the real FLARE Client API and answers the final
validate task like an honest site that installed nothing.
"""

import argparse

import nvflare.client as flare
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from transformers import AutoConfig

from flare_lora.components.flare.site_args import from_args
from flare_lora.components.training.module_shapes import target_module_shapes

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--site-config", nargs="*", default=[])
args, _ = p.parse_known_args()
rank = from_args(args.site_config)["rank"]
SHAPES = target_module_shapes(args.model, ["q_proj", "v_proj"])  # {prefix: (out, in)}, as an honest site has them
HIDDEN, VOCAB = next(iter(SHAPES.values()))[1], AutoConfig.from_pretrained(args.model).vocab_size
EMBED = "base_model.model.model.embed_tokens"  # an nn.Embedding: (out, in) = (vocab, hidden) like a linear layer


def factors(scale=0.0, dtype=torch.float32, widen=0):
    """Zero-effect (scale 0) or scaled factors of every q_proj/v_proj (A ``widen`` columns wider)."""
    params = {}
    for prefix, (out, in_dim) in SHAPES.items():
        params[f"{prefix}.lora_A.weight"] = torch.full((rank, in_dim + widen), scale).to(dtype)
        params[f"{prefix}.lora_B.weight"] = torch.full((out, rank), scale).to(dtype)
    return params


def meta(**changes):
    return {"num_examples": 8, "rank": rank, "alpha": 2.0 * rank, "merged_rounds": merged, **changes}


ATTACKS = [  # (name, params, meta): the server must reject every one, naming why
    ("wrong shape, answered first", lambda: factors(widen=1), meta),
    ("extra module into the embeddings", lambda: {
        **factors(), f"{EMBED}.lora_A.weight": torch.full((rank, HIDDEN), 0.01),
        f"{EMBED}.lora_B.weight": torch.full((VOCAB, rank), 0.01)}, meta),
    ("num_examples owning the aggregate", factors, lambda: meta(num_examples=10**15)),
    ("finite factors whose product overflows", lambda: factors(scale=1e30), meta),
    ("float8 factors", lambda: factors(dtype=torch.float8_e4m3fn), meta),
    ("non-string keys", lambda: {i: t for i, t in enumerate(factors().values())}, meta),
    ("negative merged_rounds", factors, lambda: meta(merged_rounds=-5)),
    ("num_examples not a number", factors, lambda: meta(num_examples="lots")),
    ("a subset of the modules", lambda: {k: v for k, v in factors().items() if "q_proj" in k}, meta),
    ("huge A, tiny B: the product within the bound", lambda: {
        k: v + (1e3 if "lora_A" in k else 1e-6) for k, v in factors().items()}, meta),
]

merged = 0  # it never installs a global
flare.init()
while flare.is_running() and (task := flare.receive()) is not None:
    if flare.is_train():
        name, params, make_meta = ATTACKS[task.current_round % len(ATTACKS)]
        print(f"hostile site: round {task.current_round}: {name}", flush=True)
        flare.send(FLModel(params=params(), params_type=ParamsType.FULL, meta=make_meta()))
    else:  # validate, like an honest site that installed nothing
        flare.send(FLModel(metrics={"eval_loss": 0.0}, meta={"merged_rounds": merged}))
