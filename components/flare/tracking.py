"""Live experiment tracking, the FLARE way: each site streams the evaluation of every round's global
model with ``nvflare.client.tracking``, the server streams what it received from each site's
training (loss, tokens/s: the result as it left the site, after the site's privacy filters), the
client-level DP ε the site's filter reported, and the bytes it moved; the job's receiver (FLARE's TensorBoard or MLflow receiver,
``add_experiment_tracking``) writes them on the server as they arrive. Steps are the report's
rounds: step t is the global model after t training rounds (0: the pretrained model) and round t's
training.

Training statistics are streamed by the server, not the site, so that they are exactly what the
site's result released: a site under DP-SGD or client-level DP withholds them from its result (in
any filter configuration), and then nothing of them is streamed either.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

TRACKING = ("tensorboard", "mlflow", "none")
EVAL_KEYS = ("eval_loss", "exact_match", "mc_accuracy", "dp_epsilon")
TRAIN_KEYS = ("train_loss", "tokens_per_s")  # from a received result's "train" entry (server side)

progress = logging.getLogger("flare_lora.progress")  # one console line per site per round (log_config.py)


class SiteTracker:
    """A site's evaluation scalars, streamed to the server's receiver through the Client API."""

    def __init__(self):
        from nvflare.client.tracking import SummaryWriter

        self.writer = SummaryWriter()

    def evaluated(self, step: int, metrics: Mapping) -> None:
        """The evaluation of the global model of ``step`` rounds on this site's held-out records."""
        self._scalars(EVAL_KEYS, metrics, step)

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


def server_scalars(fl_ctx, site: str, step: int, values: Mapping) -> None:
    """Stream ``values`` the server holds about ``site`` (what its result carried, the bytes it moved)
    to the job's receiver, recorded under that site as its own scalars are (FLARE's receivers take the
    origin of a federated event from its peer identity: the site the values describe). The event is
    fired through the engine, as FLARE's federated-event widget posts one it received."""
    from nvflare.apis.analytix import AnalyticsDataType, LogWriterName
    from nvflare.apis.fl_constant import EventScope, FLContextKey, ReservedKey
    from nvflare.apis.utils.analytix_utils import create_analytic_dxo
    from nvflare.app_common.executors.client_api_executor import FED_ANALYTIC_EVENT_TYPE

    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            data = create_analytic_dxo(key, float(value), AnalyticsDataType.SCALAR, global_step=step,
                                       writer=LogWriterName.TORCH_TB).to_shareable()
            data.set_peer_props({ReservedKey.IDENTITY_NAME: site})
            fl_ctx.set_prop(FLContextKey.EVENT_DATA, data, private=True, sticky=False)
            fl_ctx.set_prop(FLContextKey.EVENT_SCOPE, EventScope.FEDERATION, private=True, sticky=False)
            fl_ctx.get_engine().fire_event(FED_ANALYTIC_EVENT_TYPE, fl_ctx)  # as FLARE posts a received fed event
