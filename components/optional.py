"""Components a site may not install: Opacus (``flare-lora[dp]``), TenSEAL (``flare-lora[he]``),
matplotlib (``flare-lora[report]``).

Their modules are imported on first use through :func:`optional`, so a site without DP or HE
needs neither; a job that asks for one where it is missing fails with one line naming the extra
to install, before anything starts in the simulator or a POC (:func:`require_for`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

EXTRAS = {"opacus": "dp", "tenseal": "he", "matplotlib": "report"}


class MissingExtra(ImportError):
    """A component flare-lora imports on demand is not installed; names the pip extra."""


def load(module: str):
    """``module`` imported, or MissingExtra naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise MissingExtra(f"{package} is not installed: pip install \"flare-lora[{EXTRAS[package]}]\" "
                           f"(or pip install {package})") from None


class optional:  # noqa: N801 - used like a module
    """A module imported on first attribute access (``optional("tenseal").ckks_vector(...)``)."""

    def __init__(self, module: str):
        self._name = module

    def __getattr__(self, attr: str):
        return getattr(load(self._name), attr)


def require_for(cfg: Mapping, he: bool, site: str) -> None:
    """MissingExtra (naming the site) unless what ``cfg`` (a site's settings) and ``he`` need is installed."""
    needed = (["opacus"] if cfg.get("dp_epsilon") is not None or cfg.get("dp_noise_multiplier") is not None else []) \
        + (["tenseal"] if he else [])
    for module in needed:
        try:
            load(module)
        except MissingExtra as e:
            raise MissingExtra(f"site {site!r}: {e}") from None
