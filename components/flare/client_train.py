"""FLARE Client API script: the one site-side training path shared by every flare-lora job.

FLARE runs it in-process (ScriptRunner) or as an external process (RestartingExecutor). Each
task it installs the global state the server sent (method strategy), evaluates that global model
on the site's held-out split, and — for "train" tasks — trains its own LoRA and uploads the
factors (``--method full``: trains every weight of a small model and uploads them all).

``--method selective`` (nvflare_jobs/selective_layer) swaps the per-task work for the
:class:`SelectiveSite` task handler — "score" (per-layer gradient statistics and the site's layer
budget), "train" (only the assigned decoder layers, full weights or their LoRA factors) and
"validate" — on the same model loading, data, train and eval loop.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from dataclasses import replace

import nvflare.client as flare
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from flare_lora.components.algorithms.merge import weights_digest
from flare_lora.components.algorithms.shared_a import b_only
from flare_lora.components.data.prompts import truncated
from flare_lora.components.data.site_data import load_site_data
from flare_lora.components.flare.ddp import SiteGroup
from flare_lora.components.flare.site_admission import admit_job
from flare_lora.components.flare.site_args import client_parser, from_args
from flare_lora.components.flare.tracking import SiteTracker
from flare_lora.components.site_local import SiteLocal
from flare_lora.components.strategies import SharedA, get_method
from flare_lora.components.training.config import SiteConfig
from flare_lora.components.training.lora import (
    add_lora,
    base_weights,
    freeze_lora_a,
    layer_parameters,
    layer_state,
    load_layer_state,
    lora_state,
    reset_lora,
    score_parameters,
    set_trainable_layers,
    trainable_state,
)
from flare_lora.components.training.models import load_model_and_tokenizer, resolve_model_dir
from flare_lora.components.training.trainer import evaluate, layer_criterion, layer_scores, set_threads, train_lora
from flare_lora.privacy.dp_sgd import DPSGD, DPUnsupported
from flare_lora.privacy.released_stats import released_train_stats
from flare_lora.privacy.dp_reference import INIT_SEED_KEY

log = logging.getLogger("flare_lora.client")


def parse_args(argv=None) -> argparse.Namespace:
    return client_parser(__doc__).parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    group = SiteGroup()  # under torchrun: this site's DDP processes, rank 0 talks to FLARE
    flare.init(rank=group.rank)
    site = group.share(flare.get_site_name())
    cfg = SiteConfig.from_dict(from_args(args.site_config), site)
    local, cfg = admit_job(site, cfg, job_id=flare.get_job_id(), processes=group.world)
    args.model, args.data = local.resolve("model", args.model), local.resolve("data", args.data)
    set_threads(cfg.threads)
    if args.method == SELECTIVE:
        if group.world > 1:
            raise ValueError(f"site {site!r}: --method selective runs one process per site, got {group.world}")
        serve(SelectiveSite.from_args(args, site, cfg, local))
        return
    method = get_method(args.method)

    model, tokenizer = load_model(args.model, cfg)
    if method.lora:
        model = add_lora(model, cfg, site)
        if method.shared_a:
            freeze_lora_a(model)
    model.to(group.device)
    trained = group.wrap(model)  # what train_lora steps: DDP averages the ranks' gradients
    train_set, eval_set, cut = site_records(args, site, cfg, tokenizer)
    log.info(f"{site}: {len(train_set)} train / {len(eval_set)} eval records, "
             + (f"rank {cfg.rank}" if method.lora else "full-parameter fine-tuning"))
    dp = DPSGD.for_site(cfg, site, len(train_set), local)  # None without DP; a spent budget fails here
    if dp is not None and group.world > 1:
        raise DPUnsupported(f"site {site!r}: DP-SGD with {group.world} DDP processes is not supported; use --ddp 1")
    merged = 0
    tracker = SiteTracker() if group.is_main else None

    for task in group.tasks(flare):
        rnd = task.current_round
        seed = cfg.seed * 1000003 + rnd * 1009 + args.site_index  # this site's data order this round
        init_seed = seed if method.site_specific_init else seed - args.site_index  # averaging: shared init
        if task.init_seed is not None:  # client-level DP derives the start itself from the seed it handed out
            init_seed = task.init_seed
        if method.shared_a:  # A: the round's shared draw, from the key the server names (B starts at 0)
            if not task.shared_a_key:
                raise ValueError(f"site {site!r}: method shared_a, but the task names no {SharedA.TASK_KEY!r}")
            method.key = task.shared_a_key
            init_seed = method.round_seed(rnd)
        merged = method.install(model, task.params, merged, seed=init_seed)
        digest = weights_digest(base_weights(model))
        group.check_same(digest, f"site {site!r} round {rnd}: base weights")
        if group.is_main:
            metrics = evaluate(model, tokenizer, eval_set, cfg)
            meta = {"merged_rounds": merged, "base_digest": digest}
            tracker.evaluated(rnd, dp_metrics(metrics, dp))
        if not task.train:
            if group.is_main:
                flare.send(FLModel(metrics=dp_metrics(metrics, dp), meta=meta))
            continue
        stats = train_lora(trained, tokenizer, group.shard(train_set), replace(cfg, seed=seed),
                           desc=f"{site} round {rnd}", dp=dp)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        group.check_same(weights_digest(trainable), f"site {site!r} round {rnd}: trained weights")
        if not group.is_main:
            continue
        stats.update(processes=group.world, truncated=cut)
        stats = released_train_stats(stats) if dp is not None else stats
        meta.update(num_examples=len(train_set), train=stats)
        metrics = dp_metrics(metrics, dp)
        if method.lora:
            meta.update(rank=cfg.rank, alpha=cfg.alpha)
        params = lora_state(model) if method.lora else trainable_state(model)
        params = b_only(params) if method.shared_a else params
        flare.send(FLModel(params=params, params_type=ParamsType.FULL, metrics=metrics, meta=meta))
    group.close()


def site_records(args: argparse.Namespace, site: str, cfg: SiteConfig, tokenizer) -> tuple[list, list, int]:
    """(train, eval, how many training records are longer than max_length), the count logged here."""
    train_set, eval_set = load_site_data(args.data, site, args.site_index, seed=cfg.seed)
    cut = truncated(tokenizer, train_set, cfg.max_length, f"site {site!r} training data")
    cut_eval = truncated(tokenizer, eval_set, cfg.max_length, f"site {site!r} evaluation data")
    if cut or cut_eval:
        log.warning(f"{site}: {cut} of {len(train_set)} training and {cut_eval} of {len(eval_set)} evaluation records "
                    f"are longer than max_length {cfg.max_length} tokens and are cut (site config key max_length)")
    return train_set, eval_set, cut


def load_model(model: str | None, cfg: SiteConfig):
    """The base model in the site's dtype, with gradient checkpointing when the site asks for it."""
    model, tokenizer = load_model_and_tokenizer(resolve_model_dir(model), dtype=cfg.torch_dtype)
    if cfg.gradient_checkpointing:  # non-reentrant: the frozen base needs no input gradients
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def dp_metrics(metrics: dict, dp: DPSGD | None) -> dict:
    """The round's metrics plus the ε this site has spent (sample-level DP), when it trains with DP."""
    return {**metrics, "dp_epsilon": dp.spent} if dp is not None else metrics


# --- selective-layer fine-tuning ------------------------------------------------------------

SELECTIVE = "selective"


class SelectiveSite:
    """Client half of selective-layer fine-tuning: answers "score", "train" and "validate" tasks.

    Invariant: between tasks the site's model *is* the global model at the layer versions it
    reports — every payload's layers are installed, and after local training the site uploads
    its assigned layers and restores their global values. Plain torch, no FLARE calls: the
    FLARE loop (:func:`serve`) and in-process benchmarks drive the same object.
    """

    def __init__(self, model, tokenizer, train_set, eval_set, cfg: SiteConfig, *, site: str,
                 site_index: int = 0, mode: str = "lora", budget: int | None = None,
                 score_batches: int = 2, layer_cap: int | None = None, dp: DPSGD | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.train_set, self.eval_set = train_set, eval_set
        self.cfg, self.site, self.site_index, self.mode = cfg, site, site_index, mode
        self.num_layers = len(layer_parameters(model, mode))
        self.configured_budget = self.num_layers if budget is None else budget
        self.budget_cap = layer_cap  # the site admin's max_layers (local/flare_lora.json): lowers the budget
        self.budget = min(self.configured_budget, self.budget_cap or self.configured_budget)
        self.score_batches = score_batches
        self.versions: dict[int, int] = {}
        self.dp = dp  # sample-level DP-SGD for train tasks; layer scores then carry no data
        self.truncated = 0  # training records longer than max_length

    @classmethod
    def from_args(cls, args: argparse.Namespace, site: str, cfg: SiteConfig, local: SiteLocal) -> SelectiveSite:
        model, tokenizer = load_model(args.model, cfg)
        if args.mode == "lora":
            model = add_lora(model, cfg, site)
            reset_lora(model, args.init_seed)  # every site starts from the same adapter
        else:
            for param in model.parameters():
                param.requires_grad_(False)
        train_set, eval_set, cut = site_records(args, site, cfg, tokenizer)
        handler = cls(model, tokenizer, train_set, eval_set, cfg, site=site, site_index=args.site_index,
                      mode=args.mode, budget=args.budget, score_batches=args.score_batches,
                      layer_cap=local.max_layers, dp=DPSGD.for_site(cfg, site, len(train_set), local))
        handler.truncated = cut
        log.info(f"{site}: {len(train_set)} train / {len(eval_set)} eval records, mode {args.mode}, "
                 f"{handler.num_layers} layers, budget {handler.budget} (cap {handler.budget_cap})")
        return handler

    def install(self, params: Mapping, meta: Mapping) -> None:
        """Load the global layers the server sent and record their versions."""
        if params:
            load_layer_state(self.model, dict(params), self.mode)
        for layer, version in (meta.get("layer_versions") or {}).items():
            self.versions[int(layer)] = int(version)

    def digest(self) -> str:
        return weights_digest(dict(self.model.named_parameters()))

    def layers_digest(self) -> str:
        """Digest of the tensors the job trains (lora mode: the factors only): cheap, sent with every score."""
        layers = layer_parameters(self.model, self.mode).values()
        return weights_digest({key: param for params in layers for key, param in params.items()})

    def _meta(self, **extra) -> dict:
        return {"layer_versions": {str(k): v for k, v in sorted(self.versions.items())},
                "num_layers": self.num_layers, **extra}

    def handle(self, task: str, params: Mapping, meta: Mapping, rnd: int = 0) -> tuple[dict, dict, dict]:
        """(params, metrics, meta) to send back for one task."""
        self.install(params, meta)
        if task == "score":
            return {}, {}, self.score(meta.get("criterion", "grad_norm"), rnd)
        metrics = evaluate(self.model, self.tokenizer, self.eval_set, self.cfg)
        if task != "train":
            return {}, dp_metrics(metrics, self.dp), self._meta(digest=self.digest())
        update, stats = self.train(meta.get("layers") or [], rnd, meta.get(INIT_SEED_KEY))
        layers = sorted({int(l) for l in meta.get("layers") or []})
        return update, dp_metrics(metrics, self.dp), self._meta(num_examples=len(self.train_set), layers=layers, train=stats)

    def score(self, criterion: str, rnd: int = 0) -> dict:
        if self.dp is not None:  # gradient scores of the training records would bypass DP: report none
            return self._meta(scores=[0.0] * self.num_layers, criterion=criterion, budget=self.budget,
                              budget_configured=self.configured_budget, budget_cap=self.budget_cap,
                              digest=self.layers_digest(), dp_scores="withheld")
        stats = layer_scores(
            self.model, self.tokenizer, self.train_set, self.cfg, score_parameters(self.model, self.mode),
            batches=self.score_batches, seed=self.cfg.seed * 1000003 + rnd * 1009 + self.site_index + 17,
        )
        return self._meta(
            scores=layer_criterion(stats, criterion), criterion=criterion, budget=self.budget,
            budget_configured=self.configured_budget, budget_cap=self.budget_cap, digest=self.layers_digest(),
            score_tokens=stats["tokens"], score_seconds=stats["seconds"],
        )

    def train(self, layers, rnd: int = 0, init_seed: int | None = None) -> tuple[dict, dict | None]:
        """Train only ``layers``; return their trained tensors, then restore their global values.

        ``init_seed`` (client-level DP): LoRA layers no global has reached yet start from the fresh
        adapter of that seed, the start the DP filter derives itself (privacy/dp_reference.py). Their
        B is zero before and after, so the model's outputs do not change."""
        layers = sorted({int(l) for l in layers})
        if not layers:
            return {}, None
        if init_seed is not None and self.mode == "lora":
            fresh = [l for l in layers if self.versions.get(l, 0) == 0]
            by_layer = layer_parameters(self.model, "lora")
            reset_lora(self.model, int(init_seed), {k.rsplit(".lora_", 1)[0] for l in fresh for k in by_layer[l]})
        snapshot = layer_state(self.model, layers, self.mode)
        set_trainable_layers(self.model, layers, self.mode)
        seed = self.cfg.seed * 1000003 + rnd * 1009 + self.site_index
        try:
            stats = train_lora(self.model, self.tokenizer, self.train_set, replace(self.cfg, seed=seed),
                               desc=f"{self.site} round {rnd} layers {layers}", dp=self.dp)
            update = layer_state(self.model, layers, self.mode)
        finally:
            load_layer_state(self.model, snapshot, self.mode)
            set_trainable_layers(self.model, [], self.mode)
        stats.update(layers=layers, truncated=self.truncated)
        return update, released_train_stats(stats) if self.dp is not None else stats


def serve(handler: SelectiveSite) -> None:
    """The FLARE Client API loop around a task handler."""
    tracker = SiteTracker()
    while flare.is_running():
        task = flare.receive()
        if task is None:
            break
        rnd = task.current_round or 0
        params, metrics, meta = handler.handle(flare.get_task_name(), task.params or {}, task.meta or {}, rnd)
        tracker.evaluated(rnd, metrics)
        flare.send(FLModel(params=params or None, params_type=ParamsType.FULL if params else None,
                           metrics=metrics, meta=meta))


if __name__ == "__main__":
    main()
