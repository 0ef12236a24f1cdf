"""What may leave a site beside its weights when DP is on.

DP-SGD and client-level DP bound what the *weights* reveal; a round's exact training loss and token
counts are computed from the same records and would leave the site beside them unprotected. They
are withheld, not noised: the server logs the steps, the time and the DP accounting only.

Under client-level DP the job's own code may be hostile, so the filter rebuilds a result's meta
(``released_meta``): each entry the server needs is there only if the job's result had it, and its
value is the filter's own (``facts``: what the server's tasks said, what the filter measured, or a
value pinned at the job's first result here), never the job's. The record count is 1: the whole
dataset is the unit client-level DP protects, so sites weigh equally. A selective site's layer
scores are zeros (withheld), as under DP-SGD. Evaluation metrics of the *global* model on the
site's held-out records leave as finite numbers under known names; their values are computed by the
job's code and not covered by DP (docs/dp.md, "What leaves a DP site").
"""

from __future__ import annotations

import math
from collections.abc import Mapping

RELEASED_TRAIN_STATS = ("steps", "seconds", "processes", "layers", "dp")
METRICS_KEY = "initial_metrics"  # nvflare MetaKey.INITIAL_METRICS: the evaluation metrics of a result
FLARE_LORA_METRICS = ("eval_loss", "perplexity", "n", "exact_match", "mc_accuracy", "mc_n", "dp_epsilon",
                      "client_dp_epsilon")
MAX_METRICS = 64  # names a job other than flare-lora's may report
CRITERIA = ("grad_norm", "rgn", "snr")  # a selective site's layer-score criteria
FACT_KEYS = ("merged_rounds", "layers", "layer_versions", "rank", "alpha", "num_layers", "budget",
             "budget_configured", "budget_cap")


def released_train_stats(stats: Mapping) -> dict:
    """``stats`` (trainer.train_lora's, plus the site's) without what was computed from the records."""
    return {k: v for k, v in stats.items() if k in RELEASED_TRAIN_STATS}


def finite_number(value) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def released_metrics(metrics, names: tuple[str, ...] | None = None) -> dict:
    """The entries named in ``names`` (None: any short printable name, at most MAX_METRICS) whose
    value is a finite number."""
    if not isinstance(metrics, Mapping):
        return {}
    out = {}
    for key, value in metrics.items():
        number = finite_number(value)
        named = key in names if names is not None else isinstance(key, str) and len(key) <= 64 and key.isprintable()
        if named and number is not None:
            out[key] = number
        if len(out) >= MAX_METRICS:
            break
    return out


def released_meta(meta: Mapping, facts: Mapping, metric_names: tuple[str, ...] | None = None) -> tuple[dict, list[str]]:
    """(the meta a result leaves with under client-level DP, the names of the job's entries dropped)."""
    out: dict = {}
    if "num_examples" in meta:
        out["num_examples"] = 1
    if "num_steps_current_round" in meta:  # nvflare FedAvg's weight: the same for every site
        out["num_steps_current_round"] = 1
    for key in FACT_KEYS:
        if key in meta and facts.get(key) is not None:
            out[key] = facts[key]
    if meta.get("criterion") in CRITERIA:
        out["criterion"] = meta["criterion"]
    if "scores" in meta and isinstance(facts.get("num_layers"), int):  # computed from the records
        out["scores"], out["dp_scores"] = [0.0] * facts["num_layers"], "withheld"
    if isinstance(meta.get("train"), Mapping) and facts.get("seconds") is not None:
        out["train"] = {"seconds": facts["seconds"]}  # measured by the filter: task in to result out
    if METRICS_KEY in meta:
        out[METRICS_KEY] = released_metrics(meta[METRICS_KEY], metric_names)
    dropped = sorted(str(k)[:40] for k in meta if k not in out)
    return out, dropped
