"""``LoraRecipe``: one FLARE Recipe for every federated LoRA method (flora, fedit, zero_pad, fedcdd).

Validates the whole job configuration before anything starts (site, key, expected vs got), then
wires the LoraController on the server and one ScriptRunner per site running the shared client
script with that site's own rank/alpha/target modules/optimiser settings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from nvflare.client.config import ExchangeFormat
from nvflare.fuel.utils.constants import FrameworkType
from nvflare.job_config.api import FedJob
from nvflare.job_config.file_source import FileSource
from nvflare.job_config.script_runner import ScriptRunner
from nvflare.recipe.spec import Recipe

from components.data.site_data import load_site_data
from components.algorithms.noise_mask import check_mask_options
from components.flare.controller import LoraController
from components.flare.noise_mask import NoiseMaskFilter
from components.flare.site_args import to_args
from components.methods import get_method
from components.training.config import ConfigError, SiteConfig

CLIENT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "client_train.py")  # a path: importing it would load the trainer
PACKAGE_DIR = os.path.dirname(os.path.dirname(CLIENT_SCRIPT))  # .../components


class LoraRecipe(Recipe):
    def __init__(
        self,
        *,
        sites: Mapping[str, Mapping],
        name: str = "flora",
        method: str = "flora",
        num_rounds: int = 3,
        min_clients: int | None = None,
        clients_per_round: int | None = None,
        model: str | None = None,
        data: str | None = None,
        seed: int = 0,
        launch_external_process: bool = True,
        command: str = "python3 -u",
        task_timeout: int = 0,
        wait_for_clients_timeout: float = 300.0,
        site_scripts: Mapping[str, str] | None = None,
        method_options: Mapping | None = None,
        mask_rho: float | None = None,
        mask_sigma: float = 1e-3,
        mask_mode: str = "replace",
        mask_importance: str = "entry",
    ):
        """Args:
        sites: {site name: per-site config} (keys of SiteConfig: rank, alpha, target_modules,
            lr, local_steps, batch_size, grad_accum, threads, ...). Order fixes each site's index.
        method: "flora" (exact stacking, default), "fedit", "zero_pad" or "fedcdd".
        min_clients: fewest valid updates per round (default: all sites, or clients_per_round).
        clients_per_round: sample this many sites per round (partial participation).
        model: local model dir (safetensors or GGUF) or None for the embedded SmolLM2-135M.
        data: dir with one ``<site>.jsonl`` per site, or None for the embedded tasks.
        launch_external_process: run the client script as its own process (default) or in the
            FLARE client process.
        site_scripts: {site: script path} for sites that bring their own training code speaking
            the same protocol (they receive the same arguments as the shared client script).
        method_options: options of the method's server strategy, e.g. for fedcdd
            {"variant": "consensus", "temperature": 0.1, "target": "delta"} (docs/fedcdd.md).
        mask_rho: if set, every site masks its update before upload (components/flare/noise_mask.py):
            keeps the top mask_rho fraction of each tensor's entries, mask_mode "replace" or
            "perturb" the rest with N(0, mask_sigma^2); mask_importance "entry" or "column".
            Not differential privacy.
        """
        get_method(method, **dict(method_options or {}))
        if not sites:
            raise ConfigError("sites: expected at least one site, got none")
        configs = {site: SiteConfig.from_dict(dict(cfg), site) for site, cfg in sites.items()}
        if method == "fedit":
            _check_homogeneous(configs)
        if method == "fedcdd" and dict(method_options or {}).get("target", "factors") == "factors":
            _check_homogeneous(configs, method="fedcdd (target factors)", keys=("rank", "target_modules"))
        if mask_rho is not None:
            check_mask_options(mask_rho, mask_sigma, mask_mode, mask_importance)
        _check_positive("num_rounds", num_rounds)
        if clients_per_round is not None:
            _check_positive("clients_per_round", clients_per_round)
        min_clients = min_clients if min_clients is not None else min(clients_per_round or len(sites), len(sites))
        _check_positive("min_clients", min_clients)
        if min_clients > len(sites):
            raise ConfigError(f"min_clients: expected <= number of sites ({len(sites)}), got {min_clients}")
        for label, path in (("model", model), ("data", data)):
            if path and os.path.sep in path and not os.path.exists(path):
                raise FileNotFoundError(f"{label} directory not found: {path}")
        if data and os.path.isdir(data):  # local data (simulator, POC): bad files fail before the job starts
            for index, site in enumerate(configs):
                load_site_data(data, site, index, seed=configs[site].seed)
        if not launch_external_process:
            for label, path in (("model", model), ("data", data)):
                if path and any(c.isspace() for c in path):
                    raise ConfigError(f"{label}: in-process mode cannot pass a path with spaces: {path!r}")

        self.sites = {s: c.to_dict() for s, c in configs.items()}
        self.method = method
        self.num_rounds = num_rounds
        self.method_options = dict(method_options) if method_options else None
        self.mask_rho = mask_rho
        self.mask_sigma = mask_sigma
        self.mask_mode = mask_mode
        self.mask_importance = mask_importance
        job = FedJob(name=name, min_clients=min_clients)
        job.to_server(
            LoraController(
                method=method,
                num_rounds=num_rounds,
                min_clients=min_clients,
                clients_per_round=clients_per_round,
                site_configs={s: {"rank": c.rank, "alpha": c.alpha} for s, c in configs.items()},
                base_model=model or "",
                seed=seed,
                task_timeout=task_timeout,
                wait_for_clients_timeout=wait_for_clients_timeout,
                method_options=self.method_options,
            ),
            id="controller",
        )
        for index, (site, cfg) in enumerate(self.sites.items()):
            args = ["--method", method, "--site-index", str(index)]
            args += ["--model", model] if model else []
            args += ["--data", os.path.abspath(data)] if data else []
            args += ["--site-config", *to_args(cfg)]
            runner = ScriptRunner(
                script=(site_scripts or {}).get(site, CLIENT_SCRIPT),
                script_args=" ".join(args),
                launch_external_process=launch_external_process,
                command=command,
                framework=FrameworkType.PYTORCH,
                server_expected_format=ExchangeFormat.PYTORCH,
            )
            job.to(runner, site)
        super().__init__(job)
        if mask_rho is not None:  # site side, on the outgoing train result: the server sees only masked updates
            mask = NoiseMaskFilter(
                rho=mask_rho, sigma=mask_sigma, mode=mask_mode, importance=mask_importance, seed=seed
            )
            self.add_client_output_filter(mask, tasks=["train"])
            # FLARE copies the filter's module (and what it imports) into each site's custom/
            # folder: a partial `components` namespace that would shadow the installed package
            # for the client script (an editable install is found only after sys.path). Ship the
            # whole package there instead, as the server already runs its copied controller code.
            self._add_to_client_apps(FileSource(PACKAGE_DIR, dest_dir="components", app_folder_type="custom"))


def _check_positive(key: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}: expected an integer >= 1, got {value!r}")


def _check_homogeneous(
    configs: Mapping[str, SiteConfig], method: str = "fedit", keys=("rank", "alpha", "target_modules")
) -> None:
    """FedIT averages A's and B's elementwise: every site needs the same rank, alpha and modules."""
    first_site, first = next(iter(configs.items()))
    hint = "use method flora or zero_pad for heterogeneous ranks"
    if method != "fedit":
        hint = "use method flora or zero_pad, or fedcdd with target delta, for heterogeneous ranks"
    for site, cfg in configs.items():
        for key in keys:
            if getattr(cfg, key) != getattr(first, key):
                raise ConfigError(
                    f"site {site!r}: key {key!r}: {method} needs the same value at every site "
                    f"(expected {getattr(first, key)!r} as at {first_site!r}, got {getattr(cfg, key)!r}); "
                    + hint
                )
