"""``OneShotRecipe``: the one-shot job — every site trains once, the server folds results as they arrive.

Same sites, client script and validation as every job (recipe_base.py), one round; the server
workflow is the ``OneShotController``. ``method`` "flora" (LoRA, incremental stacking, ranks may
differ), "fedit" (LoRA, running average, one rank) or "full" (full-parameter fine-tuning).
"""

from __future__ import annotations

from collections.abc import Mapping

from flare_lora.components.flare.one_shot_controller import OneShotController, check_one_shot_options
from flare_lora.components.flare.recipe import check_shared_a
from flare_lora.components.flare.recipe_base import SiteRecipe, check_same, declared
from flare_lora.components.training.config import ConfigError, SiteConfig


class OneShotRecipe(SiteRecipe):
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
        **common,
    ):
        """Args: those of SiteRecipe, less num_rounds, min_clients, clients_per_round, checkpoint_dir
        and task_timeout (one round, ended by deadline and timeout; the global is persisted after
        every arrival), plus min_sites
        (default: all sites), deadline, late_grace, timeout, evaluate_global as in OneShotController."""
        for key in ("num_rounds", "min_clients", "clients_per_round", "checkpoint_dir", "task_timeout"):
            if common.get(key) not in (None, "", 0 if key == "task_timeout" else None, 1 if key == "num_rounds" else None):
                raise ConfigError(f"{key}: not an option of the one-shot job (one round; min_sites, deadline, "
                                  f"late_grace and timeout decide when it ends), got {common[key]!r}")
            common.pop(key, None)
        min_sites = len(sites) if min_sites is None else min_sites
        try:
            check_one_shot_options(method, len(sites), min_sites, deadline, late_grace, timeout)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.method = method
        self.min_sites, self.deadline, self.late_grace, self.timeout = min_sites, deadline, late_grace, timeout
        self.evaluate_global = evaluate_global
        super().__init__(sites=sites, name=name, num_rounds=1, min_clients=min_sites, **common)

    @property
    def pins_modules(self) -> bool:
        return self.method != "full"  # "full" results are full weights, not LoRA factors

    def client_dp_refusal(self) -> str | None:
        if self.method == "full":
            return ("method 'full' trains from the sites' base weights, which the server never sends, so the "
                    "filter has no data-independent reference; use method flora or fedit")
        return None

    def check(self, configs: Mapping[str, SiteConfig], *, num_rounds: int, he: bool) -> None:
        if he and self.method == "shared_a":
            raise ConfigError("--he: one-shot shared_a cannot fold ciphertexts yet; use the multi-round job "
                              "(nvflare_jobs/flora/job.py --method shared_a --rounds 1 --he) or one-shot flora/fedit")
        if self.method == "fedit":  # a running average of A's and B's: one rank, alpha and module set
            check_same(configs, ("rank", "alpha", "target_modules"), "fedit", "use method flora for heterogeneous ranks")

    def make_controller(self, configs: Mapping[str, SiteConfig], workflow_args: dict):
        check_shared_a(self.method, self.module_shapes)
        return OneShotController(method=self.method, sites=list(configs), deadline=self.deadline,
                                 late_grace=self.late_grace, timeout=self.timeout,
                                 evaluate_global=self.evaluate_global,
                                 site_configs=declared(configs), module_shapes=self.module_shapes,
                                 max_update_norm=self.max_update_norm if self.pins_modules else None,
                                 **{k: v for k, v in workflow_args.items() if k not in ("clients_per_round", "checkpoint_dir", "task_timeout")})

    def site_args(self, site: str, index: int, seed: int) -> list[str]:
        return ["--method", self.method]
