"""What a site's training statistics may say about its records when DP is on.

DP-SGD and client-level DP bound what the *weights* reveal; a round's exact training loss and token
counts are computed from the same records and would leave the site beside them unprotected. They
are withheld, not noised: the server logs the steps, the time and the DP accounting only
(docs/dp.md, "What leaves a DP site").
"""

from __future__ import annotations

from collections.abc import Mapping

RELEASED_TRAIN_STATS = ("steps", "seconds", "processes", "layers", "dp")


def released_train_stats(stats: Mapping) -> dict:
    """``stats`` (trainer.train_lora's, plus the site's) without what was computed from the records."""
    return {k: v for k, v in stats.items() if k in RELEASED_TRAIN_STATS}
