"""``LoraRecipe``: one FLARE Recipe for every federated LoRA method (flora, fedit, zero_pad, fedcdd).

Validates the whole job configuration before anything starts (site, key, expected vs got), then
wires the LoraController on the server and, per site, the shared client script (a training process,
started again if it dies) with that site's own rank/alpha/target modules/optimiser settings.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Mapping

from nvflare.app_common.executors.client_api_executor import ExecutionMode
from nvflare.client.config import ExchangeFormat
from nvflare.fuel.utils.constants import FrameworkType
from nvflare.job_config.api import FedJob
from nvflare.job_config.file_source import FileSource
from nvflare.job_config.script_runner import ScriptRunner
from nvflare.recipe.spec import Recipe

from flare_lora.components.data.site_data import load_site_data
from flare_lora.components.algorithms.noise_mask import check_mask_options
from flare_lora.components.flare.controller import LoraController
from flare_lora.components.flare.noise_mask import NoiseMaskFilter
from flare_lora.components.flare.restarting_executor import RestartingExecutor
from flare_lora.components.flare.site_args import to_args
from flare_lora.components.methods import get_method
from flare_lora.components.training.config import ConfigError, SiteConfig
from flare_lora.privacy.flare.client_dp_filter import ClientDPFilter
from flare_lora.privacy.dp_config import plan_dp_steps
from flare_lora.privacy.he_aggregate import check_he_method
from flare_lora.privacy.he_context import CLIENT_CONTEXT, SERVER_CONTEXT, he_server_context
from flare_lora.privacy.flare.he_filters import add_he_filters

CLIENT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "client_train.py")  # a path: importing it would load the trainer
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(CLIENT_SCRIPT)))  # .../flare_lora


def client_script() -> str:
    """CLIENT_SCRIPT, or a copy of it where FLARE will put it where ScriptRunner looks for it.

    ScriptRunner starts ``custom/<basename>``, but the job export copies the script to custom/ at
    its path relative to the deepest ``sys.path`` entry that holds it. With the checkout root on
    sys.path (``python -m pytest``, a notebook in the checkout) that is
    ``custom/components/flare/client_train.py`` and every site fails to start; a copy in a
    directory off sys.path is copied to ``custom/client_train.py``. (The script only imports the
    installed package, so the copy runs the same code.)
    """
    here = os.path.dirname(os.path.realpath(CLIENT_SCRIPT))
    roots = {os.path.realpath(p or os.curdir) for p in sys.path}
    if here in roots or not any(here.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
        return CLIENT_SCRIPT
    copy = os.path.join(tempfile.mkdtemp(prefix="flare_lora_client_"), os.path.basename(CLIENT_SCRIPT))
    shutil.copyfile(CLIENT_SCRIPT, copy)
    return copy
CLIENT_MODULE = "flare_lora.components.flare.client_train"
INSTALLED_PACKAGES = ("flare_lora",)  # what `pip install flare-lora` puts on a site


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
        controller=None,
        checkpoint_dir: str = "",
        max_result_bytes: int = 0,
        byoc: bool = True,
        client_dp: Mapping | None = None,
        he: bool = False,
        he_context_dir: str | None = None,
        max_trainer_restarts: int = 3,
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
        controller: the server workflow to use instead of a LoraController built from these
            arguments (the one-shot recipe passes its OneShotController).
        command: how each site starts the client script; ``"torchrun --standalone
            --nproc_per_node=N"`` trains with N DDP processes per site (docs/production.md).
        checkpoint_dir / max_result_bytes: see LoraController (server checkpoint + resume, and
            the cap on a site's result size).
        byoc: False makes a job without code: sites run the pip-installed flare-lora
            (``python -m flare_lora.components.flare.client_train``) and must allow its classes instead of
            granting the "byoc" right (components/flare/site_policy.py).
        client_dp: if set, every site clips and noises its update before upload (privacy/
            client_dp_filter.py): {"clip": C, "sigma": σ, "delta": δ, "epsilon_max": ε_max}.
            Sample-level DP-SGD is per-site config instead (the ``dp_*`` keys; docs/dp.md).
        he: homomorphic-encrypted aggregation (docs/he.md): sites encrypt their update after any
            DP/mask filter and decrypt the global; the server aggregates ciphertexts without a
            secret key. Contexts come from the startup kits (FLARE's HEBuilder), or with
            he_context_dir from a folder made by flare_lora.privacy.he_context.provision_sim_contexts
            (simulator, test-only). A missing context fails the job before training.
        max_trainer_restarts: how often per job a site launches a new training process after
            its last one died (components/flare/restarting_executor.py); 0: never.
        """
        get_method(method, **dict(method_options or {}))
        if he and controller is None:  # a given controller (one-shot) checks its own method
            try:
                check_he_method(method)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if he and checkpoint_dir:
            raise ConfigError("checkpoint_dir: checkpoints hold plaintext rounds; not available with he")
        if he_context_dir:
            for context in (SERVER_CONTEXT, CLIENT_CONTEXT):
                if not os.path.isfile(os.path.join(he_context_dir, context)):
                    raise FileNotFoundError(f"he_context_dir: {os.path.join(he_context_dir, context)} not found")
        if not sites:
            raise ConfigError("sites: expected at least one site, got none")
        configs = {site: SiteConfig.from_dict(dict(cfg), site) for site, cfg in sites.items()}
        if method == "fedit":
            _check_homogeneous(configs)
        if method == "flora" and num_rounds > 1:  # every site merges each round into its base weights
            _check_homogeneous(configs, method="flora", keys=("dtype",),
                               hint="sites keep identical base weights only when they merge in the same dtype")
        if he and method == "zero_pad":  # ciphertexts add slot by slot: the same tensors at every site
            _check_homogeneous(configs, method="zero_pad with he", keys=("target_modules",))
        if method == "fedcdd" and dict(method_options or {}).get("target", "factors") == "factors":
            _check_homogeneous(configs, method="fedcdd (target factors)", keys=("rank", "target_modules"))
        if mask_rho is not None:
            check_mask_options(mask_rho, mask_sigma, mask_mode, mask_importance)
        check_positive("num_rounds", num_rounds)
        check_restarts(max_trainer_restarts)
        min_clients = check_participation(len(sites), min_clients, clients_per_round)
        check_paths(model=model, data=data)
        if data and os.path.isdir(data):  # local data (simulator, POC): bad files fail before the job starts
            for index, site in enumerate(configs):
                load_site_data(data, site, index, seed=configs[site].seed)
        if not byoc and (not launch_external_process or site_scripts):
            raise ConfigError("byoc: a job without code needs launch_external_process=True and no site_scripts")
        if not launch_external_process:
            for label, path in (("model", model), ("data", data)):
                if path and any(c.isspace() for c in path):
                    raise ConfigError(f"{label}: in-process mode cannot pass a path with spaces: {path!r}")

        dp_filter = ClientDPFilter(**dict(client_dp)) if client_dp is not None else None  # validates
        configs = plan_dp_steps(configs, num_rounds)
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
            controller or LoraController(
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
                checkpoint_dir=checkpoint_dir,
                max_result_bytes=max_result_bytes,
                he=he,
                he_context=he_server_context(he_context_dir),
            ),
            id="controller",
        )
        if not byoc:  # the sites' installed packages provide this code: copy none of it into the job
            job.set_app_packages(list(INSTALLED_PACKAGES))
        shared_script = client_script()
        for index, (site, cfg) in enumerate(self.sites.items()):
            args = ["--method", method, "--site-index", str(index)]
            args += ["--model", model] if model else []
            args += ["--data", os.path.abspath(data)] if data else []
            args += ["--site-config", *to_args(cfg)]
            script = None if not byoc else (site_scripts or {}).get(site) or shared_script
            add_site_trainer(job, site, args, script=script, command=command,
                             launch_external_process=launch_external_process, max_restarts=max_trainer_restarts)
        super().__init__(job)
        if mask_rho is not None:  # site side, on the outgoing train result: the server sees only masked updates
            mask = NoiseMaskFilter(
                rho=mask_rho, sigma=mask_sigma, mode=mask_mode, importance=mask_importance, seed=seed
            )
            self.add_client_output_filter(mask, tasks=["train"])
        if dp_filter is not None:  # site side too: the server sees only clipped and noised changes
            self.add_client_output_filter(dp_filter, tasks=["train"])
        if he:  # added last, so that encryption sees what DP and the mask produced
            add_he_filters(self, he_context_dir, ("train", "validate"))


def add_site_trainer(job: FedJob, site: str, args: list[str], *, script: str | None, command: str = "python3 -u",
                     launch_external_process: bool = True, max_restarts: int = 3) -> None:
    """One site's client script under FLARE's Client API, tensors exchanged as PyTorch.

    ``script``: a script the job carries (BYOC), or None for the pip-installed client module.
    External process (default): started by ``command``, and started again at the next task after
    it died (RestartingExecutor). Otherwise in the FLARE client process (nvflare's ScriptRunner).
    A BYOC job carries the whole ``flare_lora`` package (its filters too): FLARE's copy of the
    modules its components import would otherwise be a partial package shadowing the installed one.
    """
    if not launch_external_process:  # adds the script to the job too
        job.to(ScriptRunner(script=script, script_args=" ".join(args), framework=FrameworkType.PYTORCH,
                            server_expected_format=ExchangeFormat.PYTORCH), site)
    else:
        if script is None:
            entry = ["-m", CLIENT_MODULE]
        else:  # where the job export puts the script (as ScriptRunner has it)
            entry = [f"custom/{os.path.basename(script) if os.path.isabs(script) else script}"]
            job.to(script, site)
        job.to(RestartingExecutor(
            execution_mode=ExecutionMode.EXTERNAL_PROCESS,
            command=[*shlex.split(command), *entry, *args],
            params_exchange_format=ExchangeFormat.PYTORCH,
            server_expected_format=ExchangeFormat.PYTORCH,
            max_restarts=max_restarts,
        ), site)
    if script is not None:
        job.to(FileSource(PACKAGE_DIR, dest_dir="flare_lora", app_folder_type="custom"), site)


def check_restarts(max_trainer_restarts) -> None:
    if not isinstance(max_trainer_restarts, int) or isinstance(max_trainer_restarts, bool) or max_trainer_restarts < 0:
        raise ConfigError(f"max_trainer_restarts: expected an integer >= 0, got {max_trainer_restarts!r}")


def check_participation(num_sites: int, min_clients: int | None, clients_per_round: int | None) -> int:
    """Validated min_clients (default: all sites, or clients_per_round when sampling)."""
    if clients_per_round is not None:
        check_positive("clients_per_round", clients_per_round)
    min_clients = min_clients if min_clients is not None else min(clients_per_round or num_sites, num_sites)
    check_positive("min_clients", min_clients)
    if min_clients > num_sites:
        raise ConfigError(f"min_clients: expected <= number of sites ({num_sites}), got {min_clients}")
    return min_clients


def check_paths(**paths: str | None) -> None:
    """A local path that does not exist fails before the job starts (hub ids have no separator)."""
    for label, path in paths.items():
        if path and os.path.sep in path and not os.path.exists(path):
            raise FileNotFoundError(f"{label} directory not found: {path}")


def check_positive(key: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}: expected an integer >= 1, got {value!r}")


def _check_homogeneous(configs: Mapping[str, SiteConfig], method: str = "fedit",
                       keys=("rank", "alpha", "target_modules"), hint: str | None = None) -> None:
    """FedIT averages A's and B's elementwise: every site needs the same rank, alpha and modules."""
    first_site, first = next(iter(configs.items()))
    if hint is None:
        hint = ("use method flora or zero_pad for heterogeneous ranks" if method == "fedit"
                else "use method flora or zero_pad, or fedcdd with target delta, for heterogeneous ranks")
    for site, cfg in configs.items():
        for key in keys:
            if getattr(cfg, key) != getattr(first, key):
                raise ConfigError(
                    f"site {site!r}: key {key!r}: {method} needs the same value at every site "
                    f"(expected {getattr(first, key)!r} as at {first_site!r}, got {getattr(cfg, key)!r}); "
                    + hint
                )
