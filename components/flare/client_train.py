"""FLARE Client API script: the one site-side training path shared by every flare-lora job.

FLARE runs it in-process or as an external process (ScriptRunner). Each task it installs the
global state the server sent (method strategy), evaluates that global model on the site's held-out
split, and — for "train" tasks — trains its own LoRA and uploads the factors.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace

import nvflare.client as flare
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from components.algorithms.merge import weights_digest
from components.data.site_data import load_site_data
from components.flare.site_args import from_args
from components.methods import get_method
from components.training.config import SiteConfig
from components.training.lora import add_lora, base_weights, lora_state
from components.training.models import load_model_and_tokenizer, resolve_model_dir
from components.training.trainer import evaluate, set_threads, train_lora

log = logging.getLogger("flare_lora.client")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--method", default="flora")
    p.add_argument("--model", default=None, help="local model dir (safetensors or GGUF); default: embedded")
    p.add_argument("--data", default=None, help="dir with <site>.jsonl files; default: embedded tasks")
    p.add_argument("--site-index", type=int, default=0, help="picks the embedded task mix")
    p.add_argument("--site-config", nargs="*", default=[], help="key=value tokens: rank=8 alpha=16 ...")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    flare.init()
    site = flare.get_site_name()
    cfg = SiteConfig.from_dict(from_args(args.site_config), site)
    set_threads(cfg.threads)
    method = get_method(args.method)

    model, tokenizer = load_model_and_tokenizer(resolve_model_dir(args.model))
    model = add_lora(model, cfg, site)
    train_set, eval_set = load_site_data(args.data, site, args.site_index, seed=cfg.seed)
    log.info(f"{site}: {len(train_set)} train / {len(eval_set)} eval records, rank {cfg.rank}")
    merged = 0

    while flare.is_running():
        task = flare.receive()
        if task is None:
            break
        rnd = task.current_round or 0
        seed = cfg.seed * 1000003 + rnd * 1009 + (args.site_index if method.site_specific_init else 0)
        merged = method.install(model, task.params or {}, merged, seed=seed)
        metrics = evaluate(model, tokenizer, eval_set, cfg)
        meta = {"merged_rounds": merged, "base_digest": weights_digest(base_weights(model))}
        if not flare.is_train():
            flare.send(FLModel(metrics=metrics, meta=meta))
            continue
        stats = train_lora(model, tokenizer, train_set, replace(cfg, seed=seed), desc=f"{site} round {rnd}")
        meta.update(num_examples=len(train_set), rank=cfg.rank, alpha=cfg.alpha, train=stats)
        flare.send(FLModel(params=lora_state(model), params_type=ParamsType.FULL, metrics=metrics, meta=meta))


if __name__ == "__main__":
    main()
