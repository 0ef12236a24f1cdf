"""Live experiment tracking, the FLARE way: each site streams its scalars with
``nvflare.client.tracking``, the server streams what only it measures (the bytes each site moved),
and the job's receiver (FLARE's TensorBoard or MLflow receiver, ``add_experiment_tracking``)
writes them on the server as they arrive. Steps are the report's rounds: step t is the global
model after t training rounds (0: the pretrained model) and round t's training.

What a site streams is what its result releases anyway: under DP-SGD or client-level DP the
training loss and token counts (computed from the training records) stay at the site.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

TRACKING = ("tensorboard", "mlflow", "none")
EVAL_KEYS = ("eval_loss", "exact_match", "mc_accuracy", "dp_epsilon", "client_dp_epsilon")
TRAIN_KEYS = ("train_loss", "tokens_per_s")

progress = logging.getLogger("flare_lora.progress")  # one console line per site per round (log_config.py)


class SiteTracker:
    """A site's scalars, streamed to the server's receiver through the Client API."""

    def __init__(self):
        from nvflare.client.tracking import SummaryWriter

        self.writer = SummaryWriter()

    def evaluated(self, step: int, metrics: Mapping) -> None:
        """The evaluation of the global model of ``step`` rounds on this site's held-out records."""
        self._scalars(EVAL_KEYS, metrics, step)

    def trained(self, step: int, stats: Mapping | None, private: bool) -> None:
        """Round ``step``'s local training: only what leaves the site with the update anyway."""
        if stats and not private:
            self._scalars(TRAIN_KEYS, stats, step)

    def _scalars(self, keys, values: Mapping, step: int) -> None:
        for key in keys:
            value = values.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
                self.writer.add_scalar(key, float(value), global_step=step)


def add_tracking(recipe, kind: str, sites) -> None:
    """Add FLARE's receiver for ``kind`` at the server, and at each site the event converter an
    in-process trainer's scalars need to reach it (an external trainer's go there directly)."""
    if kind == "none":
        return
    from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE
    from nvflare.app_common.widgets.convert_to_fed_event import ConvertToFedEvent
    from nvflare.recipe.utils import add_experiment_tracking

    from flare_lora.components.flare.nvflare_compat import recipe_job

    add_experiment_tracking(recipe, kind)  # MLflow: a SQLite store in the job's result folder
    for site in sites:
        recipe_job(recipe).to(ConvertToFedEvent(events_to_convert=[ANALYTIC_EVENT_TYPE]), site, id="event_to_fed")


def server_scalars(component, fl_ctx, site: str, step: int, values: Mapping) -> None:
    """Stream ``values`` the server measured for ``site`` (tag ``<site>/<key>``) to the job's receiver."""
    from nvflare.apis.analytix import AnalyticsDataType
    from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
    from nvflare.apis.analytix import LogWriterName
    from nvflare.app_common.executors.client_api_executor import FED_ANALYTIC_EVENT_TYPE

    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            dxo = create_analytic_dxo(f"{site}/{key}", float(value), AnalyticsDataType.SCALAR, global_step=step,
                                      writer=LogWriterName.TORCH_TB)
            send_analytic_dxo(component, dxo, fl_ctx, event_type=FED_ANALYTIC_EVENT_TYPE)
