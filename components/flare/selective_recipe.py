"""``SelectiveRecipe``: the FLARE Recipe of a selective-layer fine-tuning job.

Validates the configuration before anything starts (site, key, expected vs got) — including each
site's layer budget against the model's number of decoder layers when the model is local — then
wires the SelectiveController on the server and, per site, the shared client script
(``components/flare/client_train.py --method selective``) with that site's settings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from nvflare.job_config.api import FedJob
from nvflare.recipe.spec import Recipe

from flare_lora.components.algorithms.layer_selection import CRITERIA, check_budgets, check_costs, check_lam
from flare_lora.components.data.site_data import load_site_data
from flare_lora.components.flare.recipe import (
    add_site_trainer,
    check_participation,
    check_paths,
    check_positive,
    check_restarts,
    client_script,
)
from flare_lora.components.flare.selective_controller import SelectiveController
from flare_lora.components.flare.site_args import to_args
from flare_lora.components.training.config import ConfigError, SiteConfig
from flare_lora.privacy.flare.client_dp_filter import ClientDPFilter
from flare_lora.privacy.dp_config import check_dp_selection, plan_dp_steps
from flare_lora.privacy.he_context import CLIENT_CONTEXT, SERVER_CONTEXT, he_server_context
from flare_lora.privacy.flare.he_filters import add_he_filters

SELECTIVE_KEYS = ("budget",)  # per-site keys beyond SiteConfig's
SCORE_FREE = ("full", "top", "bottom", "random")  # selections that never read the sites' layer scores


def model_num_layers(model: str | None) -> int | None:
    """num_hidden_layers of a local model (the default one when it resolves), else None."""
    path = None
    if model is None:
        try:
            from flare_lora.components.training.models import resolve_model_dir

            path = resolve_model_dir(None)
        except (FileNotFoundError, OSError, ImportError):
            return None
    elif os.path.isdir(model):
        path = model
    config = os.path.join(path or "", "config.json")
    if not path or not os.path.isfile(config):
        return None
    with open(config) as f:
        value = json.load(f).get("num_hidden_layers")
    return value if isinstance(value, int) and value > 0 else None


class SelectiveRecipe(Recipe):
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
        num_rounds: int = 3,
        min_clients: int | None = None,
        clients_per_round: int | None = None,
        model: str | None = None,
        data: str | None = None,
        costs: list[int] | None = None,
        seed: int = 0,
        launch_external_process: bool = True,
        command: str = "python3 -u",
        task_timeout: int = 0,
        wait_for_clients_timeout: float = 300.0,
        site_scripts: Mapping[str, str] | None = None,
        client_dp: Mapping | None = None,
        he: bool = False,
        he_context_dir: str | None = None,
        max_trainer_restarts: int = 3,
    ):
        """Args:
        sites: {site: settings}: the keys of SiteConfig (rank, alpha, target_modules, lr,
            local_steps, batch_size, ...) plus ``budget``, the number of decoder layers the site
            trains per round (default: all; in cost units with ``costs``).
        selection: "selective" (the consistency-regularised solver) or a baseline: full, top,
            bottom, random, rgn, snr.
        mode: "lora" (LoRA factors of the chosen layers; every site needs the same rank, alpha
            and target modules, since a layer's adapter is averaged FedIT-style) or "full".
        lam: λ >= 0, the weight of the selection-consistency term (selective only).
        sel_gap: re-select layers every sel_gap rounds.
        score_batches: local batches each site measures its layer scores on (snr needs >= 2).
        costs: per-layer integer costs (default 1 each).
        client_dp: client-level DP filter at every site, as in LoraRecipe. Sites with sample-level
            DP (``dp_*`` keys) withhold their layer scores, so they need a selection that reads
            none (full, top, bottom, random).
        he / he_context_dir: encrypted per-layer aggregation, as in LoraRecipe (docs/he.md).
        Other args as in LoraRecipe.
        """
        if selection not in CRITERIA:
            raise ConfigError(f"selection: expected one of {list(CRITERIA)}, got {selection!r}")
        if mode not in ("lora", "full"):
            raise ConfigError(f"mode: expected 'lora' or 'full', got {mode!r}")
        lam = check_lam(lam)
        if not sites:
            raise ConfigError("sites: expected at least one site, got none")
        for key, value in (("num_rounds", num_rounds), ("sel_gap", sel_gap), ("score_batches", score_batches)):
            check_positive(key, value)
        check_restarts(max_trainer_restarts)
        if selection == "snr" and score_batches < 2:
            raise ConfigError(f"score_batches: selection 'snr' needs >= 2 (mean/std over batches), got {score_batches}")
        min_clients = check_participation(len(sites), min_clients, clients_per_round)
        check_paths(model=model, data=data)

        budgets, configs = {}, {}
        for site, settings in sites.items():
            settings = dict(settings)
            budgets[site] = settings.pop("budget", None)
            configs[site] = SiteConfig.from_dict(settings, site)
        if mode == "lora":
            _check_same_adapter(configs)
        check_dp_selection(configs, selection, SCORE_FREE)
        configs = plan_dp_steps(configs, num_rounds)
        dp_filter = ClientDPFilter(**dict(client_dp)) if client_dp is not None else None  # validates
        for context in (SERVER_CONTEXT, CLIENT_CONTEXT) if he_context_dir else ():
            if not os.path.isfile(os.path.join(he_context_dir, context)):
                raise FileNotFoundError(f"he_context_dir: {os.path.join(he_context_dir, context)} not found")
        num_layers = model_num_layers(model)
        if num_layers is not None:
            layer_costs = check_costs(costs, num_layers)
            given = {s: b for s, b in budgets.items() if b is not None}
            if given:
                check_budgets(list(given.values()), len(given), layer_costs, list(given))
        else:
            for site, b in budgets.items():
                if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
                    raise ConfigError(f"site {site!r}: budget: expected an integer >= 1, got {b!r}")
        if data and os.path.isdir(data):
            for index, site in enumerate(configs):
                load_site_data(data, site, index, seed=configs[site].seed)
        if not launch_external_process:
            for label, path in (("model", model), ("data", data)):
                if path and any(c.isspace() for c in path):
                    raise ConfigError(f"{label}: in-process mode cannot pass a path with spaces: {path!r}")

        self.sites = {s: c.to_dict() for s, c in configs.items()}
        self.budgets = budgets
        self.num_layers = num_layers
        first = next(iter(configs.values()))
        job = FedJob(name=name, min_clients=min_clients)
        job.to_server(
            SelectiveController(
                num_rounds=num_rounds,
                selection=selection,
                mode=mode,
                lam=lam,
                sel_gap=sel_gap,
                min_clients=min_clients,
                clients_per_round=clients_per_round,
                site_budgets={s: b for s, b in budgets.items() if b is not None},
                num_layers=num_layers,
                costs=list(costs) if costs is not None else None,
                scaling=first.alpha / first.rank,
                base_model=model or "",
                seed=seed,
                task_timeout=task_timeout,
                wait_for_clients_timeout=wait_for_clients_timeout,
                he=he,
                he_context=he_server_context(he_context_dir),
            ),
            id="controller",
        )
        shared_script = client_script()
        for index, (site, cfg) in enumerate(self.sites.items()):
            args = ["--method", "selective", "--mode", mode, "--site-index", str(index)]
            args += ["--score-batches", str(score_batches), "--init-seed", str(seed)]
            args += ["--budget", str(budgets[site])] if budgets[site] is not None else []
            args += ["--model", model] if model else []
            args += ["--data", os.path.abspath(data)] if data else []
            args += ["--site-config", *to_args(cfg)]
            add_site_trainer(job, site, args, script=(site_scripts or {}).get(site) or shared_script, command=command,
                             launch_external_process=launch_external_process, max_restarts=max_trainer_restarts)
        super().__init__(job)
        if dp_filter is not None:  # site side, on the outgoing train result (privacy/flare/client_dp_filter.py)
            self.add_client_output_filter(dp_filter, tasks=["train"])
        if he:  # last, after DP; every task ships (encrypted) layers: score, train, validate
            add_he_filters(self, he_context_dir, ("score", "train", "validate"))


def _check_same_adapter(configs: Mapping[str, SiteConfig]) -> None:
    """lora mode averages each layer's A's and B's elementwise: one rank, alpha and module set."""
    first_site, first = next(iter(configs.items()))
    for site, cfg in configs.items():
        for key in ("rank", "alpha", "target_modules"):
            if getattr(cfg, key) != getattr(first, key):
                raise ConfigError(
                    f"site {site!r}: key {key!r}: mode 'lora' needs the same value at every site "
                    f"(expected {getattr(first, key)!r} as at {first_site!r}, got {getattr(cfg, key)!r}); "
                    "give every site the same one, or use mode 'full'"
                )
