"""``LoraRecipe``: the FLARE Recipe of the multi-round LoRA job (flora, shared_a, fedit, zero_pad, hlora, fedcdd).

The shared recipe core (recipe_base.py) validates and wires the sites; this adds the method's
own checks, the LoraController and the optional site-side noise mask.
"""

from __future__ import annotations

from collections.abc import Mapping

from flare_lora.components.algorithms.noise_mask import check_mask_options
from flare_lora.components.flare.controller import LoraController
from flare_lora.components.flare.noise_mask import NoiseMaskFilter
from flare_lora.components.flare.recipe_base import SiteRecipe, check_same, declared
from flare_lora.components.strategies import get_method
from flare_lora.components.training.config import ConfigError, SiteConfig
from flare_lora.privacy.he_aggregate import check_he_method

HETEROGENEOUS = "use method flora, shared_a or zero_pad, or fedcdd with target delta, for heterogeneous ranks"


def check_shared_a(method: str, module_shapes) -> None:
    if method == "shared_a" and module_shapes is None:
        raise ConfigError("method shared_a: the server draws every site's A itself from the base model's "
                          "module shapes; give --model-config (the model's dir, .gguf or config.json)")


class LoraRecipe(SiteRecipe):
    def __init__(
        self,
        *,
        sites: Mapping[str, Mapping],
        name: str = "flora",
        method: str = "flora",
        method_options: Mapping | None = None,
        mask_rho: float | None = None,
        mask_sigma: float = 1e-3,
        mask_mode: str = "replace",
        mask_importance: str = "entry",
        **common,
    ):
        """Args: those of SiteRecipe (sites, num_rounds, min_clients, model, data, he, client_dp, ...), and
        method: "flora" (exact stacking, default), "shared_a" (nested shared-A), "fedit", "zero_pad",
            "hlora" (NVFlare's fixed-rank SVD baseline) or "fedcdd".
        method_options: the method's typed options: for flora {"rank": k} or {"energy": e} (a bounded
            global), for hlora {"rank": R}, for fedcdd e.g.
            {"variant": "consensus", "temperature": 0.1, "target": "delta"} (docs/fedcdd.md).
        mask_rho: if set, every site masks its update before upload (noise_mask.py): keeps the
            top mask_rho fraction of each tensor's entries, mask_mode "replace" or "perturb" the
            rest with N(0, mask_sigma^2); mask_importance "entry" or "column". Not differential privacy.
        """
        try:
            strategy = get_method(method, **dict(method_options or {}))
            if common.get("he"):
                check_he_method(strategy)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if mask_rho is not None:
            check_mask_options(mask_rho, mask_sigma, mask_mode, mask_importance)
        self.method = method
        self.method_options = dict(method_options) if method_options else None
        self.mask_rho = mask_rho
        self.mask_sigma = mask_sigma
        self.mask_mode = mask_mode
        self.mask_importance = mask_importance
        super().__init__(sites=sites, name=name, **common)

    def check(self, configs: Mapping[str, SiteConfig], *, num_rounds: int, he: bool) -> None:
        if self.method == "fedit":
            check_same(configs, ("rank", "alpha", "target_modules"), "fedit", HETEROGENEOUS)
        if self.method in ("flora", "shared_a") and num_rounds > 1:  # every site merges each round into its base
            check_same(configs, ("dtype",), self.method,
                       "sites keep identical base weights only when they merge in the same dtype")
        if he and self.method in ("zero_pad", "shared_a"):  # ciphertexts add slot by slot: the same tensors everywhere
            check_same(configs, ("target_modules",), f"{self.method} with he", HETEROGENEOUS)
        if self.method == "fedcdd" and (self.method_options or {}).get("target", "factors") == "factors":
            check_same(configs, ("rank", "target_modules"), "fedcdd (target factors)", HETEROGENEOUS)

    def make_controller(self, configs: Mapping[str, SiteConfig], workflow_args: dict):
        check_shared_a(self.method, self.module_shapes)
        return LoraController(method=self.method, num_rounds=self.num_rounds, method_options=self.method_options,
                              site_configs=declared(configs), module_shapes=self.module_shapes,
                              max_update_norm=self.max_update_norm, **workflow_args)

    def site_args(self, site: str, index: int, seed: int) -> list[str]:
        return ["--method", self.method]

    def add_site_filters(self, seed: int) -> None:
        if self.mask_rho is not None:  # site side, on the outgoing train result: the server sees only masked updates
            mask = NoiseMaskFilter(rho=self.mask_rho, sigma=self.mask_sigma, mode=self.mask_mode,
                                   importance=self.mask_importance, seed=seed)
            self.add_client_output_filter(mask, tasks=["train"])
