"""A site whose training code is broken: it answers every train task with NaN LoRA factors.

Used by the end-to-end tests to check that the server rejects and logs a bad update while the
round goes on with the other sites. It speaks the real FLARE Client API.
"""

import argparse
import json
import os

import nvflare.client as flare
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from flare_lora.components.flare.site_args import from_args

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--site-config", nargs="*", default=[])
args, _ = p.parse_known_args()
rank = from_args(args.site_config)["rank"]
with open(os.path.join(args.model, "config.json")) as f:
    cfg = json.load(f)
hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
kv_out = cfg["num_key_value_heads"] * (hidden // cfg["num_attention_heads"])

flare.init()
while flare.is_running():
    task = flare.receive()
    if task is None:
        break
    if not flare.is_train():
        flare.send(FLModel(metrics={"eval_loss": float("nan")}, meta={"merged_rounds": 0}))
        continue
    params = {}
    for i in range(layers):
        for name, out in (("q_proj", hidden), ("v_proj", kv_out)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{name}"
            params[f"{prefix}.lora_A.weight"] = torch.full((rank, hidden), float("nan"))
            params[f"{prefix}.lora_B.weight"] = torch.zeros(out, rank)
    meta = {"num_examples": 8, "rank": rank, "alpha": 2.0 * rank, "merged_rounds": 0}
    flare.send(FLModel(params=params, params_type=ParamsType.FULL, meta=meta))
