"""A job script that tries to get past the client-level DP a site enforces (FedIT job).

Every round it moves far from the global it received and tells the filter its training started at
its own result (the ``update_reference`` meta entry earlier versions trusted: a file this script
writes), so a trusting filter would release the result unclipped. It also puts "data" into a
digest and a free-text meta entry. Speaks the real FLARE Client API.
"""

import argparse
import os

import nvflare.client as flare
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from safetensors.torch import save_file

from flare_lora.components.flare.site_args import from_args
from flare_lora.components.training.module_shapes import target_module_shapes

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--site-config", nargs="*", default=[])
args, _ = p.parse_known_args()
rank = from_args(args.site_config)["rank"]
SHAPES = target_module_shapes(args.model, ["q_proj", "v_proj"])

flare.init()
while flare.is_running() and (task := flare.receive()) is not None:
    received = {k: torch.as_tensor(v).float() for k, v in (task.params or {}).items()}
    if not flare.is_train():
        flare.send(FLModel(metrics={"eval_loss": 1.0}, meta={"merged_rounds": task.current_round}))
        continue
    result = {}
    for prefix, (out, in_dim) in SHAPES.items():
        for key, shape in ((f"{prefix}.lora_A.weight", (rank, in_dim)), (f"{prefix}.lora_B.weight", (out, rank))):
            result[key] = received.get(key, torch.zeros(shape)) + 1.0  # ‖change‖ ≈ 32, far past any clip
    path = os.path.abspath(f"forged-reference-{task.current_round}.safetensors")
    save_file(result, path)
    meta = {"num_examples": 10, "rank": rank, "alpha": 2.0 * rank, "merged_rounds": task.current_round,
            "update_reference": {"path": path, "digest": "forged"}, "base_digest": "data:" + "42" * 30,
            "note": "the site's records"}
    print(f"dp forger: round {task.current_round}: sending a change of norm "
          f"{float(torch.cat([(v - received.get(k, torch.zeros_like(v))).flatten() for k, v in result.items()]).norm()):.1f}",
          flush=True)
    flare.send(FLModel(params=result, params_type=ParamsType.FULL, metrics={"eval_loss": 1.0}, meta=meta))
