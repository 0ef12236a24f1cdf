"""Job-level DP switches: the ``--dp-*`` / ``--client-dp-*`` flags and what recipes check and fill.

Sample-level DP-SGD is per-site config (SiteConfig's ``dp_*`` keys, validated there); the flags
set the same keys at every site. Client-level DP is a filter the job adds at every site
(``client_dp`` of the recipes); a site's admin can also enforce it alone, in ``local/privacy.json``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import replace

from flare_lora.components.training.config import ConfigError, SiteConfig

# --dp-<flag> -> SiteConfig key
SITE_FLAGS = {
    "epsilon": "dp_epsilon",
    "noise_multiplier": "dp_noise_multiplier",
    "delta": "dp_delta",
    "max_grad_norm": "dp_max_grad_norm",
    "accountant": "dp_accountant",
    "epsilon_max": "dp_epsilon_max",
    "clipping": "dp_clipping",
}
CLIENT_FLAGS = ("clip", "sigma", "delta", "epsilon_max")


def add_dp_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("differential privacy (docs/dp.md); off unless given")
    g.add_argument("--dp-epsilon", type=float, default=None,
                   help="sample-level DP-SGD (Opacus) at every site: target ε over all rounds x local steps")
    g.add_argument("--dp-noise-multiplier", type=float, default=None, help="... or the noise multiplier σ")
    g.add_argument("--dp-delta", type=float, default=None, help="δ (default 1e-5; must be < 1/records)")
    g.add_argument("--dp-max-grad-norm", type=float, default=None, help="per-record clipping norm C (default 1)")
    g.add_argument("--dp-accountant", choices=["rdp", "prv"], default=None, help="default rdp")
    g.add_argument("--dp-epsilon-max", type=float, default=None, help="a site refuses to train past this ε")
    g.add_argument("--dp-clipping", choices=["hooks", "functorch", "ghost", "fast"], default=None,
                   help="Opacus per-record clipping mode (default hooks)")
    g.add_argument("--client-dp-clip", type=float, default=None,
                   help="client-level DP filter at every site: clip each update's change to this L2 norm C")
    g.add_argument("--client-dp-sigma", type=float, default=None, help="... and add N(0, (σC)²) to every entry")
    g.add_argument("--client-dp-delta", type=float, default=None, help="δ of the reported client-level ε (1e-5)")
    g.add_argument("--client-dp-epsilon-max", type=float, default=None, help="client-level budget per site")


def dp_site_settings(args) -> dict:
    """The ``dp_*`` site keys the ``--dp-*`` flags set (only those given)."""
    return {key: getattr(args, "dp_" + flag) for flag, key in SITE_FLAGS.items() if getattr(args, "dp_" + flag) is not None}


def client_dp_options(args) -> dict | None:
    """ClientDPFilter arguments from ``--client-dp-*``; None when client-level DP is off."""
    given = {flag: getattr(args, "client_dp_" + flag) for flag in CLIENT_FLAGS if getattr(args, "client_dp_" + flag) is not None}
    if not given:
        return None
    for needed in ("clip", "sigma"):
        if needed not in given:
            raise ConfigError(f"--client-dp-{needed}: client-level DP needs both --client-dp-clip and "
                              f"--client-dp-sigma, got {sorted('--client-dp-' + k.replace('_', '-') for k in given)}")
    return given


def plan_dp_steps(configs: Mapping[str, SiteConfig], num_rounds: int) -> dict[str, SiteConfig]:
    """Each site that targets dp_epsilon spreads it over num_rounds x local_steps unless it says otherwise."""
    return {
        site: replace(cfg, dp_planned_steps=num_rounds * cfg.local_steps)
        if cfg.dp_epsilon is not None and cfg.dp_planned_steps is None else cfg
        for site, cfg in configs.items()
    }


def check_dp_selection(configs: Mapping[str, SiteConfig], selection: str, score_free: tuple[str, ...]) -> None:
    """Selective-layer jobs: layer scores are gradients of the training records, outside DP-SGD's
    guarantee; a DP site withholds them, so only selections that do not read them make sense."""
    for site, cfg in configs.items():
        if cfg.dp and selection not in score_free:
            raise ConfigError(f"site {site!r}: key 'dp_epsilon'/'dp_noise_multiplier': DP sites withhold their "
                              f"layer scores (gradients of the training records); selection {selection!r} needs "
                              f"them, expected one of {list(score_free)}")
