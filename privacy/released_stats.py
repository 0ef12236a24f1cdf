"""What may leave a site beside its weights when DP is on.

DP-SGD and client-level DP bound what the *weights* reveal; a round's exact training loss and token
counts are computed from the same records and would leave the site beside them unprotected. They
are withheld, not noised: the server logs the steps, the time and the DP accounting only.

Under client-level DP the job's own code may be hostile, so the filter rebuilds a result's meta from
an allow-list (``released_meta``): known keys with values of the expected type and range, nothing
else (no digests, no free text); a selective site's layer scores are withheld (zeros), as under
DP-SGD. The record count is replaced by 1: the whole dataset is the unit
client-level DP protects, so sites weigh equally. Evaluation metrics of the *global* model on the
site's held-out records leave as finite numbers under known names; they are not covered by DP
(docs/dp.md, "What leaves a DP site").
"""

from __future__ import annotations

import math
from collections.abc import Mapping

RELEASED_TRAIN_STATS = ("steps", "seconds", "processes", "layers", "dp")
METRICS_KEY = "initial_metrics"  # nvflare MetaKey.INITIAL_METRICS: the evaluation metrics of a result
MAX_METRICS = 64
MAX_COUNT = 10**9
CRITERIA = ("grad_norm", "rgn", "snr")  # a selective site's layer-score criteria


def released_train_stats(stats: Mapping) -> dict:
    """``stats`` (trainer.train_lora's, plus the site's) without what was computed from the records."""
    return {k: v for k, v in stats.items() if k in RELEASED_TRAIN_STATS}


def _count(value, low: int = 0) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_COUNT
    return value if ok else None


def _number(value) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def released_metrics(metrics) -> dict:
    """At most MAX_METRICS entries with a short str name and a finite number."""
    if not isinstance(metrics, Mapping):
        return {}
    out = {}
    for key, value in metrics.items():
        number = _number(value)
        if isinstance(key, str) and len(key) <= 64 and key.isprintable() and number is not None:
            out[key] = number
        if len(out) >= MAX_METRICS:
            break
    return out


def _numbers(stats) -> dict:
    return {k: v for k, v in ((k, _number(v)) for k, v in stats.items()) if isinstance(k, str) and v is not None} \
        if isinstance(stats, Mapping) else {}


def released_meta(meta: Mapping, keep: tuple = ()) -> tuple[dict, list[str]]:
    """(the allow-listed meta of a result under client-level DP, the names of the entries dropped).

    ``keep``: entries of FLARE's own that pass as they are (its filter history)."""
    out: dict = {k: meta[k] for k in keep if k in meta}
    if "num_examples" in meta:
        out["num_examples"] = 1
    if "num_steps_current_round" in meta:  # nvflare FedAvg's weight: the same for every site
        out["num_steps_current_round"] = 1
    for key in ("merged_rounds", "num_layers", "budget", "budget_configured", "budget_cap"):
        if _count(meta.get(key)) is not None:
            out[key] = meta[key]
    if meta.get("criterion") in CRITERIA:
        out["criterion"] = meta["criterion"]
    scores = meta.get("scores")
    if isinstance(scores, (list, tuple)) and len(scores) <= MAX_COUNT // 1000:  # computed from the records
        out["scores"], out["dp_scores"] = [0.0] * len(scores), "withheld"
    if _count(meta.get("rank"), 1) is not None:
        out["rank"] = meta["rank"]
    if _number(meta.get("alpha")) is not None:
        out["alpha"] = _number(meta["alpha"])
    layers = meta.get("layers")
    if isinstance(layers, (list, tuple)) and all(_count(v) is not None for v in layers):
        out["layers"] = list(layers)[:100_000]
    versions = meta.get("layer_versions")
    if isinstance(versions, Mapping) and all(isinstance(k, str) and k.isdigit() and _count(v) is not None
                                             for k, v in versions.items()):
        out["layer_versions"] = dict(versions)
    train = meta.get("train")
    if isinstance(train, Mapping):
        stats = released_train_stats(train)
        kept = _numbers({k: v for k, v in stats.items() if k not in ("layers", "dp")})
        if "layers" in out:
            kept["layers"] = out["layers"]
        if isinstance(stats.get("dp"), Mapping):
            kept["dp"] = _numbers(stats["dp"])
        out["train"] = kept
    if METRICS_KEY in meta:
        out[METRICS_KEY] = released_metrics(meta[METRICS_KEY])
    dropped = sorted(str(k)[:40] for k in meta if k not in out)
    return out, dropped
