"""End to end: real FLARE simulator jobs (nvflare_jobs/flora/job.py) on a tiny random Llama.

The job tests are marked e2e; the recipe's configuration checks (no FLARE process) are not."""

import json
import subprocess
import sys

import pytest
import torch
from sim_jobs import final_digests, run_job, stacked_ranks

from flare_lora.components.report import per_round


@pytest.mark.e2e
def test_flora_heterogeneous_ranks_external_process(tmp_path, tiny_model_dir):
    """Also: the job's interpreter is not on PATH (whose python3 here has no torch), so the sites'
    training processes run only because they start with the interpreter that built the job."""
    off_path = {"PATH": "/usr/bin:/bin"}
    log, results, proc = run_job(tmp_path, tiny_model_dir, "--ranks", "2,4,8", "--rounds", "2", "--save-merged",
                                 env_extra=off_path)
    assert log["method"] == "flora" and len(log["rounds"]) == 2
    for record in log["rounds"]:
        assert sorted(record["aggregated"]) == ["site-1", "site-2", "site-3"]
    # the final adapter holds every round's stack: 2 rounds x (2+4+8) per module
    assert set(stacked_ranks(results).values()) == {2 * 14}
    digests = final_digests(log)
    assert len(digests) == 3 and len(set(digests.values())) == 1, digests
    rows = per_round(log)
    assert {r["round"] for r in rows} == {0, 1, 2}
    assert all(r["upload_bytes"] > 0 and r["download_bytes"] > 0 for r in rows if r["round"] >= 1)
    assert (results / "curves.png").stat().st_size > 0 and (results / "tensorboard").is_dir()
    assert "site-3" in proc.stdout and "eval_loss" in proc.stdout

    # the artefact loads with PEFT and adds exactly the stacked update to the base
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, results / "adapter").merge_and_unload()
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)
    # --save-merged wrote the same model as a plain HF directory
    plain = AutoModelForCausalLM.from_pretrained(results / "merged", dtype=torch.float32).state_dict()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(plain[key], value)

    # self-describing: the adapter names its base (loads with no other argument), the run's settings,
    # a model card, and flare_lora.load gives the same model
    import flare_lora
    from peft import AutoPeftModelForCausalLM

    auto = AutoPeftModelForCausalLM.from_pretrained(results / "adapter").merge_and_unload().state_dict()
    loaded, tokenizer = flare_lora.load(str(results))
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(auto[key], value)
        torch.testing.assert_close(loaded.merge_and_unload().state_dict()[key], value)
    assert tokenizer("hello")["input_ids"]
    config = json.loads((results / "run_config.json").read_text())
    assert config["command"][config["command"].index("--ranks") + 1] == "2,4,8"
    assert [c["rank"] for c in config["sites"].values()] == [2, 4, 8] and config["options"]["rounds"] == 2
    assert config["versions"]["nvflare"].startswith("2.9") and config["model"] == str(tiny_model_dir)
    report = subprocess.run([sys.executable, "-m", "flare_lora.components.cli.main", "report", str(results), "--samples", "1"],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0 and "generation samples" in report.stdout, report.stderr[-2000:]
    assert all(f"  {site}: " in report.stdout for site in ("site-1", "site-2", "site-3")) and "reference" in report.stdout
    card = (results / "adapter" / "README.md").read_text()
    assert "**Method**: flora, 2 round(s)" in card and "site-3: rank 8" in card and "none (no DP, no HE)" in card
    # a second run into the same folder is refused unless --overwrite; nothing is touched
    before_files = sorted(p.name for p in results.iterdir())
    _, _, again = run_job(tmp_path, tiny_model_dir, "--ranks", "2", "--rounds", "1", expect_ok=False)
    assert again.returncode == 2 and "holds an earlier run's results (started " in again.stderr
    assert sorted(p.name for p in results.iterdir()) == before_files


@pytest.mark.e2e
def test_flora_partial_participation_catches_up_in_process(tmp_path, tiny_model_dir):
    """A bfloat16 base with gradient checkpointing at every site (the memory switches for large
    models): sites that sat out rounds merge them later and still hold identical base weights."""
    log, _, _ = run_job(
        tmp_path, tiny_model_dir, "--ranks", "2,3,4", "--rounds", "3", "--clients-per-round", "2", "--in-process",
        "--dtype", "bfloat16", "--gradient-checkpointing",
    )  # fmt: skip
    sampled = [sorted(r["sites"]) for r in log["rounds"]]
    assert all(len(s) == 2 for s in sampled)
    assert len({s for r in sampled for s in r}) == 3, "every site should be sampled at least once"
    # a site that sat out a round received the missed stacked rounds and merged them
    digests = final_digests(log)
    assert len(digests) == 3 and len(set(digests.values())) == 1, digests
    assert all(e["merged_rounds"] == 3 for e in log["final"]["sites"].values())
    configs = [c.read_text() for c in (tmp_path / "ws").rglob("config_fed_client.json")]
    assert len(configs) == 3 and all("dtype=bfloat16" in c and "gradient_checkpointing=true" in c for c in configs)


def split_ag_news(out_dir):
    """Per-site JSONL files from the real AG News CSV via the project's split tool (label skew)."""
    from conftest import SHARED_DATA

    cmd = [sys.executable, "-m", "flare_lora.components.data.split", str(SHARED_DATA / "ag_news_test" / "test.csv")]
    cmd += ["--instruction", "Classify the topic of this news article: {title}. {description}"]
    cmd += ["--output-field", "label", "--output-map", "1=World,2=Sports,3=Business,4=Sci/Tech"]
    cmd += ["--dirichlet", "0.5", "--label-field", "label", "--sites", "3", "--max-per-site", "20", "--out", str(out_dir)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out_dir


@pytest.mark.e2e
def test_zero_pad_runs_through_the_same_job(tmp_path, tiny_model_dir):
    data = ["--data", str(split_ag_news(tmp_path / "data"))]
    log, results, _ = run_job(
        tmp_path, tiny_model_dir, "--method", "zero_pad", "--ranks", "2,4,8", "--rounds", "2", "--in-process", *data
    )
    assert log["method"] == "zero_pad" and len(log["rounds"]) == 2
    assert set(stacked_ranks(results).values()) == {8}
    # 20 records per site, 20% held out
    assert {e["num_examples"] for e in log["rounds"][0]["sites"].values()} == {16}


def test_config_errors_name_site_and_key(tmp_path, tiny_model_dir):
    """Validation happens when the recipe is built, before any FLARE process starts."""
    from flare_lora.components.flare.recipe import LoraRecipe
    from flare_lora.components.training.config import ConfigError

    def build(**kwargs):
        sites = kwargs.pop("sites", {"site-1": {"rank": 2}, "site-2": {"rank": 4}})
        return LoraRecipe(sites=sites, model=str(tiny_model_dir), **kwargs)

    with pytest.raises(ConfigError, match="site 'site-2': key 'rank'"):
        build(sites={"site-1": {"rank": 2}, "site-2": {"rank": 0}})
    with pytest.raises(ConfigError, match="min_clients"):
        build(min_clients=3)
    with pytest.raises(ConfigError, match="site 'site-2'.*fedit"):
        build(method="fedit")
    mixed = {"site-1": {"rank": 2}, "site-2": {"rank": 4, "dtype": "bfloat16"}}
    with pytest.raises(ConfigError, match="site 'site-2': key 'dtype': flora needs the same value at every site"):
        build(sites=mixed)
    build(sites=mixed, method="zero_pad")  # averaging sites merge nothing: each keeps its own dtype
    elsewhere = LoraRecipe(sites={"site-1": {}}, model=str(tmp_path / "no-such-model"))  # built for other machines
    with pytest.raises(FileNotFoundError, match="site 'site-1': model directory not found: .*no-such-model"):
        elsewhere.check_local_sites({})  # what a simulator / POC run checks before it starts


@pytest.mark.e2e
def test_job_cli_config_error_is_one_line_and_exit_code_2(tmp_path, tiny_model_dir):
    """The job script turns a config error into one line and exit code 2; a malformed JSONL line
    is named by file:line."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "site-1.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    _, _, proc = run_job(tmp_path, tiny_model_dir, "--ranks", "2", "--data", str(data), expect_ok=False)
    assert proc.returncode == 2 and "site-1.jsonl:2" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
