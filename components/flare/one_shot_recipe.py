"""``OneShotRecipe``: the one-shot job — every site trains once, the server folds results as they arrive.

Same sites, client script and validation as ``LoraRecipe`` (one round); the server workflow is
the ``OneShotController``. ``method`` "flora" (LoRA, incremental stacking, ranks may differ),
"fedit" (LoRA, running average, one rank) or "full" (full-parameter fine-tuning of a small model).
"""

from __future__ import annotations

from collections.abc import Mapping

from flare_lora.components.flare.one_shot_controller import OneShotController, check_one_shot_options
from flare_lora.components.flare.recipe import LoraRecipe
from flare_lora.components.training.config import ConfigError, SiteConfig
from flare_lora.privacy.he_context import he_server_context


class OneShotRecipe(LoraRecipe):
    def __init__(
        self,
        *,
        sites: Mapping[str, Mapping],
        name: str = "one_shot",
        method: str = "flora",
        min_sites: int | None = None,
        deadline: float = 3600.0,
        late_grace: float = 0.0,
        timeout: float | None = None,
        evaluate_global: bool = False,
        model: str | None = None,
        **kwargs,
    ):
        """Args: as LoraRecipe (sites, model, data, seed, launch_external_process, ...), plus
        min_sites (default: all sites), deadline, late_grace, timeout, evaluate_global as in
        ``OneShotController``."""
        min_sites = len(sites) if min_sites is None else min_sites
        try:
            check_one_shot_options(method, len(sites), min_sites, deadline, late_grace, timeout)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        configs = {site: SiteConfig.from_dict(dict(cfg), site) for site, cfg in sites.items()}
        controller = OneShotController(
            method=method,
            sites=list(sites),
            min_sites=min_sites,
            deadline=deadline,
            late_grace=late_grace,
            timeout=timeout,
            evaluate_global=evaluate_global,
            site_configs={s: {"rank": c.rank, "alpha": c.alpha} for s, c in configs.items()},
            base_model=model or "",
            he=kwargs.get("he", False),
            he_context=he_server_context(kwargs.get("he_context_dir")),
        )
        self.deadline, self.late_grace, self.min_sites = deadline, late_grace, min_sites
        super().__init__(sites=sites, name=name, method=method, num_rounds=1, min_clients=min_sites,
                         model=model, controller=controller, **kwargs)
