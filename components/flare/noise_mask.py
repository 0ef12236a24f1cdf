"""Site-side FLARE filter: Gaussian-noise masking of the LoRA update before it leaves the site.

Added to a job as a client *output* (task result) filter on the "train" task, so it runs in the
site's FLARE client process after the training script returned its update and before the
message is sent; the server and its aggregator only ever see the masked update. The math is
``flare_lora.components.algorithms.noise_mask.mask_update``; this file only finds the tensors in the DXO,
derives the per-round seed from (seed, site, round) and logs what it did.

Not differential privacy: see docs/fedcdd.md ("threat model").
"""

from __future__ import annotations

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

from flare_lora.components.algorithms.noise_mask import check_mask_options, mask_seed, mask_update


class NoiseMaskFilter(DXOFilter):
    def __init__(self, rho: float, sigma: float, mode: str = "replace", importance: str = "entry", seed: int = 0):
        """Args:
        rho: fraction of each tensor's entries kept exactly, in (0, 1].
        sigma: standard deviation of the Gaussian noise (>= 0), in the units of the parameters.
        mode: "replace" the other entries with noise, or "perturb" them (add the noise).
        importance: "entry" (|value|) or "column" (L2 norm of each column).
        seed: job seed; the round's generator is seeded with mask_seed(seed, site, round).
        """
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF], data_kinds_to_filter=None)
        check_mask_options(rho, sigma, mode, importance)
        # FLARE's job export reads constructor args back from same-named attributes
        self.rho = rho
        self.sigma = sigma
        self.mode = mode
        self.importance = importance
        self.seed = seed
        self._calls = 0

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        params = dxo.data
        if not isinstance(params, dict) or not params:
            return None
        site = fl_ctx.get_identity_name()
        rnd = shareable.get_header(AppConstants.CURRENT_ROUND)
        if rnd is None:  # not every executor copies the round onto the result: count our calls
            rnd = self._calls
        self._calls += 1
        rnd = int(rnd)
        tensors, kinds = {}, {}
        for key, value in params.items():
            if isinstance(value, np.ndarray):
                tensors[key], kinds[key] = torch.from_numpy(np.ascontiguousarray(value)), "numpy"
            elif isinstance(value, torch.Tensor):
                tensors[key], kinds[key] = value, "torch"
        generator = torch.Generator().manual_seed(mask_seed(self.seed, site, rnd))
        masked = mask_update(tensors, self.rho, self.sigma, generator, mode=self.mode, importance=self.importance)
        for key, value in masked.items():
            params[key] = value.numpy() if kinds[key] == "numpy" else value
        numel = sum(t.numel() for t in tensors.values() if t.is_floating_point())
        self.log_info(
            fl_ctx,
            f"noise mask: {site} round {rnd}: kept top {self.rho:.3g} of {numel} entries in {len(tensors)} "
            f"tensors by {self.importance}, {self.mode} rest with N(0, {self.sigma:g}^2)",
        )
        dxo.data = params
        return dxo
