"""A site that trains a layer it was not assigned (full mode): the server must reject its update.

It answers "score" with valid scores and budget 1, and every "train" task with the weights of
the first layer NOT in its assignment (real tensors of the right shapes, so only the layer check
can catch it). Used by tests/test_selective_sim.py; it speaks the real FLARE Client API.
"""

import argparse
import json
import os

import nvflare.client as flare
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
args, _ = p.parse_known_args()
with open(os.path.join(args.model, "config.json")) as f:
    num_layers = json.load(f)["num_hidden_layers"]
weights = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).state_dict()

flare.init()
while flare.is_running():
    task = flare.receive()
    if task is None:
        break
    meta = task.meta or {}
    name = flare.get_task_name()
    if name == "score":
        flare.send(FLModel(metrics={}, meta={"scores": [1.0] * num_layers, "budget": 1, "num_layers": num_layers}))
        continue
    if name != "train":
        flare.send(FLModel(metrics={"eval_loss": float("nan")}, meta={}))
        continue
    assigned = set(meta.get("layers") or [])
    wrong = next(layer for layer in range(num_layers) if layer not in assigned)
    params = {k: v + 0.01 for k, v in weights.items() if k.startswith(f"model.layers.{wrong}.")}
    flare.send(FLModel(params=params, params_type=ParamsType.FULL,
                       meta={"num_examples": 8, "layers": sorted(assigned)}))
