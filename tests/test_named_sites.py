"""Every route that names a job's sites (the job CLIs and the Recipe API) gives every named site
every shared setting: DP above all. Bad site lists fail with one error naming what is wrong.

Jobs are exported, not run (in-process, as ``flare-lora export`` does): what a site would run is
the exported config.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flare_lora.components.cli.main import JOBS, job_main
from flare_lora.components.flare.one_shot_recipe import OneShotRecipe
from flare_lora.components.flare.recipe import LoraRecipe
from flare_lora.components.flare.selective_recipe import SelectiveRecipe
from flare_lora.components.flare.site_args import from_args
from flare_lora.components.training.config import ConfigError

HOSPITALS = ["hospital-a", "hospital-b", "hospital-c"]
CLIENT_DP = "flare_lora.privacy.flare.client_dp_filter.ClientDPFilter"
PER_SITE = {"selective": ["--budgets", "1,2,1", "--rank", "2"], "fedcdd": ["--ranks", "4"]}
DP = ["--dp-epsilon", "8", "--client-dp-clip", "0.1", "--client-dp-sigma", "1.0", "--alpha-ratio", "3"]


def exported_sites(job_dir: Path) -> dict[str, dict]:
    """{site: its script's site config, plus "client_dp": whether its train results pass the filter}."""
    sites = {}
    for config in sorted(job_dir.glob("app_*/config/config_fed_client.json")):
        site = config.parts[-3].removeprefix("app_")
        client = json.loads(config.read_text())
        command = client["executors"][0]["executor"]["args"]["command"]
        cfg = from_args(command[command.index("--site-config") + 1:])
        filters = [f["path"] for g in client.get("task_result_filters", []) if "train" in g["tasks"] for f in g["filters"]]
        sites[site] = {**cfg, "client_dp": CLIENT_DP in filters}
    return sites


def export_cli(job: str, argv: list[str], where: Path, monkeypatch, capsys) -> tuple[int, str, dict]:
    where.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(where)  # nvflare's default --export-dir: ./fl_job
    capsys.readouterr()
    rc = job_main(job, argv, export=True)
    err = capsys.readouterr().err
    jobs = list((where / "fl_job").glob("*")) if rc == 0 else []
    return rc, err, exported_sites(jobs[0]) if jobs else {}


def assert_private_everywhere(sites: dict, names: list[str]) -> None:
    assert sorted(sites) == sorted(names), sites
    for site, cfg in sites.items():
        assert cfg["dp_epsilon"] == 8.0 and cfg["dp_planned_steps"], (site, cfg)
        assert cfg["client_dp"], f"{site}: client-level DP filter missing"


@pytest.mark.parametrize("job", list(JOBS))
def test_cli_named_sites_and_site_config_keep_every_shared_flag(job, tiny_model_dir, tmp_path, monkeypatch, capsys):
    sites_arg = ["--sites", ",".join(HOSPITALS)]
    per_site = PER_SITE.get(job, ["--ranks", "2,4,8"])
    base = [*per_site, "--model", tiny_model_dir, "--no-byoc", *DP]
    if job == "selective":
        base += ["--selection", "top"]  # DP sites withhold layer scores
    # --sites: names by position, every shared flag at every site
    rc, err, sites = export_cli(job, [*sites_arg, *base], tmp_path / "named", monkeypatch, capsys)
    assert rc == 0, err
    assert_private_everywhere(sites, HOSPITALS)
    if job in ("flora", "one-shot"):
        assert {s: (c["rank"], c["alpha"]) for s, c in sites.items()} == {
            "hospital-a": (2, 6.0), "hospital-b": (4, 12.0), "hospital-c": (8, 24.0)}
    # --site-config overrides one site's key (alpha follows its new rank) and keeps the rest
    override = tmp_path / "sites.json"
    stacked = job in ("flora", "one-shot")  # ranks may differ
    override.write_text(json.dumps({"hospital-b": {"lr": 0.01, **({"rank": 2} if stacked else {})}}))
    rc, err, sites = export_cli(job, [*sites_arg, *base, "--site-config", str(override)], tmp_path / "over",
                                monkeypatch, capsys)
    assert rc == 0, err
    assert_private_everywhere(sites, HOSPITALS)
    assert sites["hospital-b"]["lr"] == 0.01 and sites["hospital-a"]["lr"] != 0.01
    if stacked:
        assert sites["hospital-b"]["rank"] == 2 and sites["hospital-b"]["alpha"] == 6.0
    # default names: site-1..N from the per-site list
    rc, err, sites = export_cli(job, base, tmp_path / "default", monkeypatch, capsys)
    assert rc == 0, err
    assert_private_everywhere(sites, ["site-1", "site-2", "site-3"] if job != "fedcdd" else ["site-1"])
    # a --site-config site that is not in the job: one error naming it and the job's sites
    override.write_text(json.dumps({"hospital-x": {"lr": 0.01}}))
    rc, err, _ = export_cli(job, [*sites_arg, *base, "--site-config", str(override)], tmp_path / "typo",
                            monkeypatch, capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "'hospital-x' is not a site of this job" in err and "hospital-a" in err, err


RECIPES = {
    "lora": lambda **kw: LoraRecipe(**kw),
    "one-shot": lambda **kw: OneShotRecipe(**kw),
    "selective": lambda **kw: SelectiveRecipe(selection="top", **kw),
}


@pytest.mark.parametrize("kind", list(RECIPES))
def test_recipe_site_names_and_defaults_reach_every_site(kind, tiny_model_dir, tmp_path):
    shared = {"dp_epsilon": 8.0, "rank": 2, "alpha": 4.0}
    client_dp = {"clip": 0.1, "sigma": 1.0}
    for route, sites in (("list", HOSPITALS), ("mapping", {"hospital-a": {"lr": 0.01}, "hospital-b": {}, "hospital-c": {}})):
        recipe = RECIPES[kind](name="named", sites=sites, site_defaults=shared, model=tiny_model_dir,
                               client_dp=client_dp, byoc=False)
        recipe.export(str(tmp_path / route))
        exported = exported_sites(tmp_path / route / "named")
        assert_private_everywhere(exported, HOSPITALS)
        assert all(c["rank"] == 2 for c in exported.values())
    assert exported["hospital-a"]["lr"] == 0.01 and exported["hospital-b"]["lr"] != 0.01


@pytest.mark.parametrize("argv,message", [
    (["--sites", "hospital-a,hospital-a"], "site 'hospital-a' is named more than once"),
    (["--sites", "hospital a,hospital-b"], "site name 'hospital a' is not one FLARE accepts"),
    (["--sites", "hospital-a,,hospital-b"], "--sites: expected comma-separated site names"),
    (["--sites", "server,hospital-b"], "site name 'server' is not one FLARE accepts"),
    (["--sites", "hospital-a,hospital-b", "--ranks", "2,4,8"], "--ranks: expected 2 values (one per site"),
    (["--ranks", ""], "--sites: expected at least one site"),
])
def test_bad_site_lists_fail_with_one_error(argv, message, tmp_path, monkeypatch, capsys):
    rc, err, _ = export_cli("flora", [*argv, "--no-byoc"], tmp_path, monkeypatch, capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_recipe_refuses_bad_site_lists():
    for sites, message in ((["a", "a"], "named more than once"), (["a b"], "not one FLARE accepts"), ([], "at least one"),
                           ("hospital-a", "expected a list of site names"), ({"a": 3}, "expected a dict of settings")):
        with pytest.raises(ConfigError, match=message):
            LoraRecipe(sites=sites, byoc=False)


def test_export_needs_no_site_paths_but_a_simulator_run_checks_them(tmp_path, monkeypatch, capsys):
    missing = ["--model", "/not/here", "--data", "/not/here", "--no-byoc"]
    rc, err, sites = export_cli("flora", missing, tmp_path / "export", monkeypatch, capsys)
    assert rc == 0 and sorted(sites) == ["site-1", "site-2", "site-3"], err
    monkeypatch.chdir(tmp_path)
    rc = job_main("flora", [*missing, "--workspace", str(tmp_path / "sim")])  # refused before the simulator starts
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == "error: site 'site-1': model directory not found: /not/here", err
    assert not (tmp_path / "sim").exists()
