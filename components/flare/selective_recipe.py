"""``SelectiveRecipe``: the FLARE Recipe of a selective-layer fine-tuning job.

The shared recipe core (recipe_base.py) validates and wires the sites; this adds each site's
layer budget (checked against the model's number of decoder layers when the model is local), the
selection options and the SelectiveController. Sites run the shared client script with
``--method selective``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from flare_lora.components.algorithms.layer_selection import CRITERIA, check_budgets, check_costs, check_lam
from flare_lora.components.flare.recipe_base import SiteRecipe, check_positive, check_same
from flare_lora.components.flare.selective_controller import SelectiveController
from flare_lora.components.site_local import is_logical_name
from flare_lora.components.training.config import ConfigError, SiteConfig
from flare_lora.privacy.dp_config import check_dp_selection

SCORE_FREE = ("full", "top", "bottom", "random")  # selections that never read the sites' layer scores


def model_num_layers(model: str | None) -> int | None:
    """num_hidden_layers of a local model (the default one when it resolves), else None (a logical
    name: the sites' model, not one here)."""
    path = None
    if model is None:
        try:
            from flare_lora.components.training.models import resolve_model_dir

            path = resolve_model_dir(None)
        except (FileNotFoundError, OSError, ImportError):
            return None
    elif not is_logical_name(model) and os.path.isdir(model):
        path = model
    config = os.path.join(path or "", "config.json")
    if not path or not os.path.isfile(config):
        return None
    with open(config) as f:
        value = json.load(f).get("num_hidden_layers")
    return value if isinstance(value, int) and value > 0 else None


class SelectiveRecipe(SiteRecipe):
    he_tasks = ("score", "train", "validate")  # every task ships (encrypted) layers
    pins_modules = False  # results are whole layers, pinned to the global's layer keys and shapes

    def __init__(
        self,
        *,
        sites: Mapping[str, Mapping],
        name: str = "selective_layer",
        selection: str = "selective",
        mode: str = "lora",
        lam: float = 0.0,
        sel_gap: int = 1,
        score_batches: int = 2,
        costs: list[int] | None = None,
        **common,
    ):
        """Args: those of SiteRecipe, and
        sites: {site: settings}: the keys of SiteConfig plus ``budget``, the number of decoder
            layers the site trains per round (default: all; in cost units with ``costs``).
        selection: "selective" (the consistency-regularised solver) or a baseline: full, top,
            bottom, random, rgn, snr.
        mode: "lora" (LoRA factors of the chosen layers; every site needs the same rank, alpha
            and target modules, since a layer's adapter is averaged FedIT-style) or "full".
        lam: λ >= 0, the weight of the selection-consistency term (selective only).
        sel_gap: re-select layers every sel_gap rounds.
        score_batches: local batches each site measures its layer scores on (snr needs >= 2).
        costs: per-layer integer costs (default 1 each).
        Sites with sample-level DP (``dp_*`` keys) withhold their layer scores, so they need a
        selection that reads none (full, top, bottom, random).
        """
        if selection not in CRITERIA:
            raise ConfigError(f"selection: expected one of {list(CRITERIA)}, got {selection!r}")
        if mode not in ("lora", "full"):
            raise ConfigError(f"mode: expected 'lora' or 'full', got {mode!r}")
        for key, value in (("sel_gap", sel_gap), ("score_batches", score_batches)):
            check_positive(key, value)
        if selection == "snr" and score_batches < 2:
            raise ConfigError(f"score_batches: selection 'snr' needs >= 2 (mean/std over batches), got {score_batches}")
        self.selection, self.mode, self.lam = selection, mode, check_lam(lam)
        self.sel_gap, self.score_batches = sel_gap, score_batches
        self.costs = list(costs) if costs is not None else None
        self.budgets: dict[str, int | None] = {}
        self.num_layers = model_num_layers(common.get("model"))
        super().__init__(sites=sites, name=name, **common)

    def client_dp_refusal(self) -> str | None:
        if self.mode == "full":
            return ("mode 'full' trains layers the server has not sent yet from the sites' base weights, so the "
                    "filter has no data-independent reference; use mode 'lora'")
        if self.selection not in SCORE_FREE:  # the filter withholds layer scores
            return f"selection {self.selection!r} reads layer scores, which a DP site withholds; use one of {list(SCORE_FREE)}"
        return None

    def site_settings(self, site: str, settings: dict) -> dict:
        self.budgets[site] = settings.pop("budget", None)
        return settings

    def check(self, configs: Mapping[str, SiteConfig], *, num_rounds: int, he: bool) -> None:
        if self.mode == "lora":  # a layer's A's and B's are averaged elementwise
            check_same(configs, ("rank", "alpha", "target_modules"), "mode 'lora'",
                       "give every site the same one, or use mode 'full'")
        check_dp_selection(configs, self.selection, SCORE_FREE)
        given = {s: b for s, b in self.budgets.items() if b is not None}
        if self.num_layers is not None:
            layer_costs = check_costs(self.costs, self.num_layers)
            if given:
                check_budgets(list(given.values()), len(given), layer_costs, list(given))
            return
        for site, b in given.items():
            if not isinstance(b, int) or isinstance(b, bool) or b < 1:
                raise ConfigError(f"site {site!r}: budget: expected an integer >= 1, got {b!r}")

    def make_controller(self, configs: Mapping[str, SiteConfig], workflow_args: dict):
        first = next(iter(configs.values()))
        return SelectiveController(
            num_rounds=self.num_rounds, selection=self.selection, mode=self.mode, lam=self.lam, sel_gap=self.sel_gap,
            site_budgets={s: b for s, b in self.budgets.items() if b is not None}, num_layers=self.num_layers,
            costs=self.costs, scaling=first.alpha / first.rank, **workflow_args,
        )

    def site_args(self, site: str, index: int, seed: int) -> list[str]:
        args = ["--method", "selective", "--mode", self.mode, "--score-batches", str(self.score_batches),
                "--init-seed", str(seed)]
        return args + (["--budget", str(self.budgets[site])] if self.budgets[site] is not None else [])
