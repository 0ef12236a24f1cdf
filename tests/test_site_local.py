"""A site admin's ``local/flare_lora.json``: parsed strictly, logical names mapped to the site's own
paths, limits that refuse a job asking for more, and required protections checked against the
job's deployed config and the site's privacy scope (not against what the job claims)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flare_lora.components.data.site_data import load_site_data
from flare_lora.components.flare.recipe import LoraRecipe
from flare_lora.components.flare.site_admission import admit_job
from flare_lora.components.site_local import SiteLocal
from flare_lora.components.training.config import ConfigError, SiteConfig

PATH = "kit/local/flare_lora.json"


@pytest.mark.parametrize("text,message", [
    ('{"max_threads": 4,\n "models": }', f"{PATH} line 2 column 12: not valid JSON"),
    ('[1]', "expected a JSON object of settings, got list"),
    ('{"max_thread": 4}', "key 'max_thread': expected one of"),
    ('{"max_threads": 0}', "key 'max_threads': expected an integer >= 1, got 0"),
    ('{"require_he": "yes"}', "key 'require_he': expected true or false"),
    ('{"datasets": {"notes": "relative/notes.jsonl"}}', "key 'datasets': expected an object"),
    ('{"dp_accountant": "gdp"}', "key 'dp_accountant'"),
])
def test_bad_site_file_is_one_error_naming_site_file_and_key(text, message):
    with pytest.raises(ConfigError, match="^site 'hospital-a': ") as error:
        SiteLocal.parse(text, "hospital-a", PATH)
    assert message in str(error.value)


def test_logical_names_map_to_the_sites_own_paths():
    local = SiteLocal.parse('{"models": {"smollm2": "/srv/m"}, "datasets": {"notes": "/srv/notes.jsonl"}}',
                            "hospital-a", PATH)
    assert local.resolve("model", "smollm2") == "/srv/m" and local.resolve("data", "notes") == "/srv/notes.jsonl"
    assert local.resolve("model", "/abs/model") == "/abs/model" and local.resolve("model", "org/name") == "org/name"
    assert local.resolve("data", None) is None
    with pytest.raises(ConfigError, match=r"site 'hospital-a': data 'labs' is a logical name, but .* maps datasets "
                                          r"\['notes'\]"):
        local.resolve("data", "labs")


def test_site_limits_win_over_the_job():
    local = SiteLocal.parse('{"max_threads": 4, "max_gpus": 1, "dp_epsilon_max": 5}', "hospital-a", PATH)
    assert local.check_config(SiteConfig()).threads == 4  # unset: the site's cap
    assert local.check_config(SiteConfig(threads=2)).threads == 2
    for cfg, processes, setting in ((SiteConfig(threads=8), 1, "max_threads=4"), (SiteConfig(), 2, "max_gpus=1"),
                                    (SiteConfig(dp_epsilon=8.0), 1, "dp_epsilon_max=5")):
        with pytest.raises(ConfigError, match=f"more than this site allows \\({setting} in {PATH}\\)"):
            local.check_config(cfg, processes=processes)
    with pytest.raises(ConfigError, match="require_dp_sgd is true"):
        SiteLocal(site="a", require_dp_sgd=True).check_config(SiteConfig())


def test_a_site_records_file_with_its_own_eval_file(tmp_path):
    records = [{"instruction": f"q{i}", "output": str(i)} for i in range(6)]
    (tmp_path / "notes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "notes.eval.jsonl").write_text(json.dumps(records[0]) + "\n")
    train, evaluation = load_site_data(str(tmp_path / "notes.jsonl"), "hospital-a", 0)
    assert len(train) == 6 and len(evaluation) == 1


def deploy(tmp_path: Path, recipe: LoraRecipe, site: str, *, privacy: dict | None = None, kit: dict,
           scope: str | None = None) -> Path:
    """``recipe``'s app for ``site`` laid out as FLARE deploys it in the site's workspace; the app dir."""
    root = tmp_path / site
    (root / "startup").mkdir(parents=True)
    (root / "local").mkdir()
    (root / "local" / "flare_lora.json").write_text(json.dumps(kit))
    if privacy is not None:
        (root / "local" / "privacy.json").write_text(json.dumps(privacy))
    recipe.export(str(tmp_path / "export"))
    job = tmp_path / "export" / "job"
    shutil.copytree(job / f"app_{site}", root / "job-1" / f"app_{site}")
    meta = json.loads((job / "meta.json").read_text())
    (root / "job-1" / "meta.json").write_text(json.dumps({**meta, **({"scope": scope} if scope else {})}))
    shutil.rmtree(tmp_path / "export")
    return root / "job-1" / f"app_{site}"


def scope_with_dp(name: str) -> dict:
    return {"name": name, "task_result_filters": [
        {"path": "flare_lora.privacy.flare.client_dp_filter.ClientDPFilter", "args": {"clip": 1.0, "sigma": 1.0}}]}


@pytest.mark.parametrize("job,kit,privacy,scope,refused", [
    ({}, {"require_he": True}, None, None, "require_he is true"),
    ({"he": True}, {"require_he": True}, None, None, None),
    ({}, {"require_client_dp": True}, None, None, "require_client_dp is true"),
    # the job's own filter has the job's parameters: it does not meet the site's requirement
    ({"client_dp": {"clip": 1e9, "sigma": 1e-6}}, {"require_client_dp": True}, None, None, "require_client_dp is true"),
    # the site's own default scope protects a job that asked for nothing ...
    ({}, {"require_client_dp": True}, {"scopes": [scope_with_dp("dp"), {"name": "open"}], "default_scope": "dp"},
     None, None),
    # ... unless the job picks another scope the site defines
    ({}, {"require_client_dp": True}, {"scopes": [scope_with_dp("dp"), {"name": "open"}], "default_scope": "dp"},
     "open", "require_client_dp is true"),
])
def test_required_privacy_is_read_from_the_deployed_job(job, kit, privacy, scope, refused, tmp_path, monkeypatch):
    recipe = LoraRecipe(name="job", sites=["hospital-a", "hospital-b"], byoc=False, **job)
    app = deploy(tmp_path, recipe, "hospital-a", privacy=privacy, kit=kit, scope=scope)
    monkeypatch.chdir(app)  # where FLARE starts the site's training process
    cfg = SiteConfig.from_dict(recipe.sites["hospital-a"], "hospital-a")
    if refused:
        with pytest.raises(ConfigError, match=f"site 'hospital-a': {refused} in .*flare_lora.json"):
            admit_job("hospital-a", cfg, job_id="job-1")
    else:
        local, _ = admit_job("hospital-a", cfg, job_id="job-1")
        assert local.path == str(tmp_path / "hospital-a" / "local" / "flare_lora.json")


def test_the_shipped_example_parses():
    from importlib import resources

    text = (resources.files("flare_lora.privacy") / "examples" / "flare_lora.json").read_text()
    local = SiteLocal.parse(text, "hospital-a", "privacy/examples/flare_lora.json")
    assert local.require_he and local.max_threads == 8 and local.resolve("data", "notes").startswith("/srv/")


def test_sim_and_poc_check_every_sites_paths_before_anything_starts(tiny_model_dir, tmp_path):
    """What ``run`` checks in the simulator / a POC (through each POC site's flare_lora.json), and
    what export never checks."""
    records = "".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(5))
    (tmp_path / "a.jsonl").write_text(records)
    recipe = LoraRecipe(name="job", sites=["hospital-a"], model="tiny", data="notes", byoc=False)
    recipe.export(str(tmp_path / "export"))  # logical names: nothing to check where the job is built
    kit = {"models": {"tiny": tiny_model_dir}, "datasets": {"notes": str(tmp_path / "a.jsonl")}}
    recipe.check_local_sites({"hospital-a": {"flare_lora.json": kit}})
    with pytest.raises(ConfigError, match="site 'hospital-a': data 'notes' is a logical name"):
        recipe.check_local_sites({"hospital-a": {"flare_lora.json": {"models": kit["models"]}}})
    with pytest.raises(ConfigError, match="site 'hospital-a': model 'tiny' is a logical name, but \\(no local"):
        recipe.check_local_sites({})  # the simulator: no site files
    with pytest.raises(ConfigError, match="hospital-a/local/flare_lora.json: key 'max_threads'"):
        recipe.check_local_sites({"hospital-a": {"flare_lora.json": '{"max_threads": -1}'}})
    missing = LoraRecipe(name="job", sites=["hospital-a"], model="/not/here", byoc=False)
    missing.export(str(tmp_path / "export2"))
    with pytest.raises(FileNotFoundError, match="site 'hospital-a': model directory not found: /not/here"):
        missing.check_local_sites({})


@pytest.mark.parametrize("edit", ["tasks *", "direction in", "not last", "job kit in app"])
def test_a_job_cannot_shape_its_config_past_the_requirement(edit, tmp_path, monkeypatch):
    """Filter chains FLARE would not apply to train results, HE before other filters, or a kit of
    the job's own in its app folder: refused, as FLARE 2.9 builds the chains (exact task names,
    direction out / inout)."""
    recipe = LoraRecipe(name="job", sites=["hospital-a"], byoc=False, he=True, client_dp={"clip": 1.0, "sigma": 1.0})
    app = deploy(tmp_path, recipe, "hospital-a", kit={"require_he": True, "max_threads": 1})
    config_file = app / "config" / "config_fed_client.json"
    config = json.loads(config_file.read_text())
    group = config["task_result_filters"][0]
    if edit == "tasks *":
        group["tasks"] = ["*"]
    elif edit == "direction in":
        group["direction"] = "in"
    elif edit == "not last":
        group["filters"].reverse()
    else:  # a kit of its own, with no requirement and no limit, where the training process starts
        (app / "startup").mkdir()
        (app / "local").mkdir()
        (app / "local" / "flare_lora.json").write_text("{}")
    config_file.write_text(json.dumps(config))
    monkeypatch.chdir(app)
    cfg = SiteConfig.from_dict(recipe.sites["hospital-a"], "hospital-a")
    if edit == "job kit in app":
        with pytest.raises(ConfigError, match=f"asks for threads=.*max_threads=1 in {tmp_path / 'hospital-a'}/local"):
            admit_job("hospital-a", SiteConfig(threads=8), job_id="job-1")
        assert admit_job("hospital-a", cfg, job_id="job-1")[0].root == str(tmp_path / "hospital-a")
    else:
        with pytest.raises(ConfigError, match="require_he is true"):
            admit_job("hospital-a", cfg, job_id="job-1")


def test_site_can_refuse_job_paths_and_require_a_budget_with_dp_sgd():
    local = SiteLocal.parse('{"allow_job_paths": false, "models": {"m": "/srv/m"}}', "hospital-a", PATH)
    assert local.resolve("model", "m") == "/srv/m"
    with pytest.raises(ConfigError, match="allow_job_paths is false .* got the path '/etc/data'"):
        local.resolve("data", "/etc/data")
    with pytest.raises(ConfigError, match="require_dp_sgd is true .* but no dp_epsilon_max"):
        SiteLocal(site="a", require_dp_sgd=True).check_config(SiteConfig(dp_noise_multiplier=1e-4))
