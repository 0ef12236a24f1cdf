"""``SiteRecipe``: the Recipe core every flare-lora job specialises.

It validates what every job shares before anything starts (site, key, expected vs got), then
wires the job's server workflow and, per site, the shared client script (a training process,
started again if it dies) with that site's own settings, and the privacy filters the job asks
for: client-level DP on what leaves a site, and HE (added last, so encryption sees what DP
produced). A job supplies its controller, its sites' extra script arguments and its own checks.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence

from nvflare.apis.utils.format_check import name_check
from nvflare.app_common.executors.client_api_executor import ExecutionMode
from nvflare.client.config import ExchangeFormat
from nvflare.fuel.utils.constants import FrameworkType
from nvflare.job_config.api import FedJob
from nvflare.job_config.file_source import FileSource
from nvflare.job_config.script_runner import ScriptRunner
from nvflare.recipe.spec import Recipe

from flare_lora.components.data.site_data import load_site_data
from flare_lora.components.flare.launch_command import CLIENT_MODULE
from flare_lora.components.flare.restarting_executor import RestartingExecutor
from flare_lora.components.flare.site_args import to_args
from flare_lora.components.optional import require_for
from flare_lora.components.site_local import FILE_NAME, SiteLocal, is_logical_name
from flare_lora.components.strategies.base import DEFAULT_MAX_EXAMPLES, DEFAULT_MAX_UPDATE_NORM, check_limits
from flare_lora.components.training.config import ConfigError, SiteConfig
from flare_lora.components.training.multiple_choice import check_source
from flare_lora.privacy.dp_config import plan_dp_steps
from flare_lora.privacy.flare.client_dp_filter import ClientDPFilter
from flare_lora.privacy.flare.he_filters import add_he_filters
from flare_lora.privacy.he_context import CLIENT_CONTEXT, SERVER_CONTEXT, he_server_context

CLIENT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "client_train.py")  # a path: importing it would load the trainer
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(CLIENT_SCRIPT)))  # .../flare_lora
INSTALLED_PACKAGES = ("flare_lora",)  # what `pip install flare-lora` puts on a site
log = logging.getLogger(__name__)


class SiteRecipe(Recipe):
    """Args every job takes:
    sites: the job's site names (``["hospital-a", "hospital-b"]``), or {site name: that site's own
        config} (keys of SiteConfig: rank, alpha, target_modules, lr, local_steps, batch_size,
        grad_accum, threads, dp_*, ...). Order fixes each site's index.
    site_defaults: config every site gets (DP, steps, lr, ...); a site's own config overrides it.
    num_rounds / min_clients / clients_per_round: rounds; fewest valid results a round needs
        (default: all sites, or clients_per_round); sites sampled per round.
    model: model dir (safetensors or GGUF), a logical name each site maps to its own path in
        ``local/flare_lora.json`` (components/site_local.py), or None for the embedded SmolLM2-135M.
    data: dir with one ``<site>.jsonl`` per site, a logical name the sites map, or None for the
        embedded tasks. Paths need not exist where the job is built or exported; ``run`` in the
        simulator or a POC checks every site's model and data before anything starts.
    launch_external_process: run the client script as its own process (default) or in the
        FLARE client process. command: how a site starts it (the interpreter; ``... -m
        torch.distributed.run --nproc_per_node=N`` for N DDP processes per site).
    site_scripts: {site: script path} for sites that bring their own training code speaking
        the same protocol (they receive the same arguments as the shared client script).
    byoc: False makes a job without code: sites run the pip-installed flare-lora
        (``python -m flare_lora.components.flare.client_train``) and must allow its classes
        instead of granting the "byoc" right (site_policy.py).
    client_dp: if set, every site clips and noises its update before upload
        (privacy/flare/client_dp_filter.py): {"clip": C, "sigma": σ, "delta": δ, "epsilon_max": ε}.
        Sample-level DP-SGD is per-site config instead (the ``dp_*`` keys; docs/dp.md).
    he / he_context_dir: homomorphic-encrypted aggregation (docs/he.md); contexts come from the
        startup kits (FLARE's HEBuilder), or from he_context_dir (simulator, test-only).
    max_trainer_restarts: how often per job a site launches a new training process after its
        last one died (restarting_executor.py); 0: never.
    seed, task_timeout, wait_for_clients_timeout, checkpoint_dir, max_result_bytes, max_examples:
        those of the server workflow (workflow.py).
    max_update_norm: X, the largest ||s*B@A||_F the server accepts for one module of a site's LoRA
        update and of the round's aggregate; ||A||_F and ||s*B||_F up to √X (default 100; 0: no bound).
        LoRA jobs only.
    model_config: where the server's module shapes come from when ``model`` is a logical name or
        not on this machine: the base model's dir, .gguf or config.json (module_shapes.py). LoRA
        jobs pin every site's update to the modules the job's target_modules name on it.
    """

    pins_modules = True  # the job's updates are LoRA factors of the target modules (max_update_norm, model_config apply)

    he_tasks: tuple[str, ...] = ("train", "validate")  # tasks whose data carries the (encrypted) global

    def __init__(
        self,
        *,
        sites: Mapping[str, Mapping] | Sequence[str],
        name: str,
        site_defaults: Mapping | None = None,
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
        checkpoint_dir: str = "",
        max_result_bytes: int = 0,
        max_examples: int = DEFAULT_MAX_EXAMPLES,
        max_update_norm: float | None = None,
        model_config: str | None = None,
        byoc: bool = True,
        client_dp: Mapping | None = None,
        he: bool = False,
        he_context_dir: str | None = None,
        max_trainer_restarts: int = 3,
    ):
        sites = named_sites(sites, site_defaults)
        check_positive("num_rounds", num_rounds)
        check_restarts(max_trainer_restarts)
        if he and checkpoint_dir:
            raise ConfigError("checkpoint_dir: checkpoints hold plaintext rounds; not available with he")
        if not isinstance(max_result_bytes, int) or max_result_bytes < 0:
            raise ConfigError(f"max_result_bytes: expected an integer >= 0, got {max_result_bytes!r}")
        try:
            check_limits(max_examples, max_update_norm or 0)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not self.pins_modules and (max_update_norm is not None or model_config is not None):
            raise ConfigError(f"{'max_update_norm' if max_update_norm is not None else 'model_config'}: bounds and "
                              f"pins LoRA updates of the target modules; not an option of job {name!r}")
        if not isinstance(task_timeout, int) or task_timeout < 0:
            raise ConfigError(f"task_timeout: expected an integer >= 0 (seconds), got {task_timeout!r}")
        for context in (SERVER_CONTEXT, CLIENT_CONTEXT) if he_context_dir else ():
            if not os.path.isfile(os.path.join(he_context_dir, context)):
                raise FileNotFoundError(f"he_context_dir: {os.path.join(he_context_dir, context)} not found")
        unknown = sorted(set(site_scripts or {}) - set(sites))
        if unknown:
            raise ConfigError(f"site_scripts: site {unknown[0]!r} is not a site of this job {list(sites)}")
        min_clients = check_participation(len(sites), min_clients, clients_per_round)
        if not byoc and (not launch_external_process or site_scripts):
            raise ConfigError("byoc: a job without code needs launch_external_process=True and no site_scripts")
        if not launch_external_process:
            for label, path in (("model", model), ("data", data)):
                if path and any(c.isspace() for c in path):
                    raise ConfigError(f"{label}: in-process mode cannot pass a path with spaces: {path!r}")
        configs = {site: SiteConfig.from_dict(self.site_settings(site, dict(cfg)), site) for site, cfg in sites.items()}
        self.check(configs, num_rounds=num_rounds, he=he)
        if client_dp is not None and "seed" in client_dp:  # a known noise seed lets the server subtract the noise
            raise ConfigError("client_dp: seed: the noise is drawn from the site's OS entropy; a job cannot fix it")
        dp_filter = ClientDPFilter(**dict(client_dp)) if client_dp is not None else None  # validates
        if dp_filter is not None and self.client_dp_refusal():
            raise ConfigError(f"client_dp: {self.client_dp_refusal()}")
        configs = plan_dp_steps(configs, num_rounds)
        self.sites = {s: c.to_dict() for s, c in configs.items()}
        self.num_rounds, self.he = num_rounds, he
        model, data = job_path(model, hub_ids=True), job_path(data)
        self.model, self.data = model, data
        self.max_update_norm = DEFAULT_MAX_UPDATE_NORM if max_update_norm is None else max_update_norm
        self.module_shapes = job_module_shapes(model, model_config, configs) if self.pins_modules else None
        workflow_args = dict(
            min_clients=min_clients, clients_per_round=clients_per_round, seed=seed, task_timeout=task_timeout,
            wait_for_clients_timeout=wait_for_clients_timeout, base_model=model or "",
            max_result_bytes=max_result_bytes, max_examples=max_examples, checkpoint_dir=checkpoint_dir, he=he,
            he_context=he_server_context(he_context_dir),
        )
        job = FedJob(name=name, min_clients=min_clients)
        job.to_server(self.make_controller(configs, workflow_args), id="controller")
        if not byoc:  # the sites' installed packages provide this code: copy none of it into the job
            job.set_app_packages(list(INSTALLED_PACKAGES))
        shared_script = client_script()
        for index, (site, cfg) in enumerate(self.sites.items()):
            args = [*self.site_args(site, index, seed), "--site-index", str(index)]
            args += ["--model", model] if model else []
            args += ["--data", data] if data else []
            args += ["--site-config", *to_args(cfg)]
            script = None if not byoc else (site_scripts or {}).get(site) or shared_script
            add_site_trainer(job, site, args, script=script, command=command,
                             launch_external_process=launch_external_process, max_restarts=max_trainer_restarts)
        super().__init__(job)
        self.add_site_filters(seed)
        if dp_filter is not None:  # site side: the server sees only clipped and noised changes
            self.add_client_output_filter(dp_filter, tasks=["train"])
        if he:  # added last, so that encryption sees what DP and the mask produced
            add_he_filters(self, he_context_dir, self.he_tasks)
        if dp_filter is not None:  # after decryption: it keeps what the server sent, the start of training
            self.add_client_input_filter(ClientDPFilter(**dict(client_dp)), tasks=list(self.he_tasks))

    def client_dp_refusal(self) -> str | None:
        """Why the job's client-level DP could not be honoured (None: it can): the filter must derive
        where training started from what the server sends (privacy/dp_reference.py)."""
        return None

    def run(self, env, server_exec_params: dict | None = None, client_exec_params: dict | None = None):
        """Run in ``env``; in the simulator or a POC on this machine, every site's model and data are
        checked first (through the site's local/flare_lora.json where the POC has one)."""
        from nvflare.recipe import PocEnv, SimEnv

        if isinstance(env, (SimEnv, PocEnv)):
            self.check_local_sites(getattr(env, "local_files", {}))
        return super().run(env, server_exec_params, client_exec_params)

    def check_local_sites(self, local_files: Mapping[str, Mapping]) -> None:
        """Each site's model and data exist and load, and its limits admit the job: what the sites
        would refuse at start, refused here before anything starts."""
        for index, (site, cfg) in enumerate(self.sites.items()):
            content = (local_files.get(site) or {}).get(FILE_NAME)
            text = content.decode() if isinstance(content, bytes) else content if isinstance(content, str) \
                else json.dumps(content)
            local = SiteLocal(site=site).with_environment() if content is None else \
                SiteLocal.parse(text, site, f"{site}/local/{FILE_NAME}")
            local.check_config(SiteConfig.from_dict(cfg, site))
            require_for(cfg, self.he, site)  # Opacus / TenSEAL where this site's DP / the job's HE needs them
            try:
                model, data = local.resolve("model", self.model), local.resolve("data", self.data)
            except ConfigError as e:
                here = [v for v in (self.model, self.data) if v and is_logical_name(v) and os.path.exists(v)]
                raise ConfigError(f"{e} (for the local path {here[0]!r} write ./{here[0]})" if here else str(e)) from None
            if model and os.path.isabs(model) and not os.path.exists(model):
                raise FileNotFoundError(f"site {site!r}: model directory not found: {model}")
            if data:
                load_site_data(data, site, index, seed=cfg["seed"])
            if cfg.get("eval_mc"):  # the questions (and k solved examples per subject) load
                check_source(cfg["eval_mc"], cfg.get("eval_mc_limit"), cfg.get("eval_mc_shots", 0), f"site {site!r}")

    # --- what a job supplies -------------------------------------------------------------

    def site_settings(self, site: str, settings: dict) -> dict:
        """A site's settings as SiteConfig takes them (a job may take its own keys out first)."""
        return settings

    def check(self, configs: Mapping[str, SiteConfig], *, num_rounds: int, he: bool) -> None:
        """The job's own configuration checks (raise ConfigError naming site and key)."""

    def make_controller(self, configs: Mapping[str, SiteConfig], workflow_args: dict):
        raise NotImplementedError

    def site_args(self, site: str, index: int, seed: int) -> list[str]:
        """The job's arguments of a site's client script (before the shared ones)."""
        raise NotImplementedError

    def add_site_filters(self, seed: int) -> None:
        """Filters of the job's own before the privacy filters (the noise mask)."""


def job_module_shapes(model: str | None, model_config: str | None,
                      configs: Mapping[str, SiteConfig]) -> list[list] | None:
    """[[PEFT module prefix, out, in], ...] of every module a site of the job adapts, read from the
    base model here (``model_config``, else ``model`` where it is on this machine); None with a
    warning when neither is: the server then holds each site to its own target_modules and the
    shapes first accepted in the job."""
    from flare_lora.components.training.module_shapes import target_module_shapes

    targets = tuple(sorted({t for cfg in configs.values() for t in cfg.target_modules}))
    here = model is None or (not is_logical_name(model) and os.path.exists(model))
    if model_config is None and not here:
        log.warning(f"model {model!r} is not on this machine: the server cannot pin the sites' LoRA modules to the "
                    "base model's shapes (give model_config / --model-config: its dir, .gguf or config.json)")
        return None
    try:
        shapes = target_module_shapes(model_config or model, targets)
    except FileNotFoundError as e:
        if model_config is not None or model is not None:
            raise ConfigError(f"{'model_config' if model_config else 'model'}: {e}") from None
        log.warning(f"the embedded model is not installed here ({e}): the server cannot pin the sites' LoRA "
                    "modules to its shapes (give model_config / --model-config)")
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{'model_config' if model_config else 'model'}: {e}") from None
    return [[prefix, *shape] for prefix, shape in shapes.items()]


def client_script() -> str:
    """CLIENT_SCRIPT, or a copy of it where FLARE will put it where ScriptRunner looks for it.

    ScriptRunner starts ``custom/<basename>``, but the job export copies the script to custom/ at
    its path relative to the deepest ``sys.path`` entry that holds it (site-packages, for the
    installed package), and every site would fail to start; a copy in a directory off sys.path is
    copied to ``custom/client_train.py``. (The script only imports the package, so the copy runs
    the same code.)
    """
    here = os.path.dirname(os.path.realpath(CLIENT_SCRIPT))
    roots = {os.path.realpath(p or os.curdir) for p in sys.path}
    if here in roots or not any(here.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
        return CLIENT_SCRIPT
    copy = os.path.join(tempfile.mkdtemp(prefix="flare_lora_client_"), os.path.basename(CLIENT_SCRIPT))
    shutil.copyfile(CLIENT_SCRIPT, copy)
    return copy


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
    if script is not None:  # the code only: the package data (project.yml) would read as a job config
        for part in ("components", "privacy"):
            job.to(FileSource(os.path.join(PACKAGE_DIR, part), dest_dir=f"flare_lora/{part}", app_folder_type="custom"),
                   site)


def declared(configs: Mapping[str, SiteConfig]) -> dict[str, dict]:
    """What the server vets each site's LoRA results against."""
    return {s: {"rank": c.rank, "alpha": c.alpha, "target_modules": list(c.target_modules)} for s, c in configs.items()}


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


def named_sites(sites: Mapping[str, Mapping] | Sequence[str], defaults: Mapping | None) -> dict[str, dict]:
    """{site: site_defaults updated with that site's own config}."""
    if isinstance(sites, str) or not isinstance(sites, (Mapping, Sequence)):
        raise ConfigError(f"sites: expected a list of site names or {{site: config}}, got {sites!r}")
    check_site_names(list(sites), "sites")
    if defaults is not None and not isinstance(defaults, Mapping):
        raise ConfigError(f"site_defaults: expected a dict of settings, got {defaults!r}")
    own = sites if isinstance(sites, Mapping) else {}
    for site, cfg in own.items():
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"site {site!r}: expected a dict of settings, got {cfg!r}")
    return {site: {**(defaults or {}), **own.get(site, {})} for site in sites}


def check_site_names(names: list, where: str) -> None:
    """At least one name, each one FLARE accepts for a client, none twice."""
    if not names:
        raise ConfigError(f"{where}: expected at least one site, got none")
    for name in names:
        if not isinstance(name, str) or name_check(name, "client")[0] or name == "server":
            raise ConfigError(f"{where}: site name {name!r} is not one FLARE accepts: expected letters, digits, "
                              "'-' and '_' (and not 'server')")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{where}: site {twice[0]!r} is named more than once in {names}")


def job_path(value: str | None, hub_ids: bool = False) -> str | None:
    """--model / --data as the sites get them: a logical name unchanged, with ``hub_ids`` a model
    id ("org/name" that is no local path) unchanged, any other path made absolute (it need not
    exist here)."""
    if not value or is_logical_name(value):
        return value
    if hub_ids and re.fullmatch(r"[\w.-]+/[\w.-]+", value) and not os.path.exists(value):
        return value
    return os.path.abspath(os.path.expanduser(value))


def check_positive(key: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}: expected an integer >= 1, got {value!r}")


def check_same(configs: Mapping[str, SiteConfig], keys, why: str, hint: str) -> None:
    """Methods that combine sites' tensors elementwise need these keys equal at every site."""
    first_site, first = next(iter(configs.items()))
    for site, cfg in configs.items():
        for key in keys:
            if getattr(cfg, key) != getattr(first, key):
                raise ConfigError(
                    f"site {site!r}: key {key!r}: {why} needs the same value at every site "
                    f"(expected {getattr(first, key)!r} as at {first_site!r}, got {getattr(cfg, key)!r}); {hint}"
                )
