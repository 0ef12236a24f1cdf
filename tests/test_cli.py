"""The ``flare-lora`` command: dispatch, one-line errors with exit 2, export, report; and a job
script run by a venv's interpreter that is not on PATH (every option of every job:
tests/test_job_options.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flare_lora.components.cli.main import main
import flare_lora
from flare_lora.components.cli.results import check_results_dir, collect_results, mark_results
from flare_lora.components.cli.run_record import describe_results

ROOT = Path(__file__).resolve().parents[1]


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), lines
    return lines[-1]


def test_bad_commands_and_job_input_fail_with_one_error_line(capsys):
    assert main([]) == 2 and "expected a command" in one_error_line(capsys)
    assert main(["train"]) == 2 and "got train" in one_error_line(capsys)
    assert main(["run", "fedavg"]) == 2 and "one of flora, fedcdd, one-shot, selective" in one_error_line(capsys)
    assert main(["run", "flora", "--ranks", "4,x"]) == 2
    assert capsys.readouterr().err == "error: --ranks: expected comma-separated integers, got '4,x'\n"
    assert main(["run", "flora", "--ranks", "0"]) == 2 and "rank" in one_error_line(capsys)
    assert main(["run", "selective", "--selection", "top", "--lam", "0.3"]) == 2
    assert one_error_line(capsys).startswith("error: --lam:")
    with pytest.raises(SystemExit) as exit_:  # one round: the one-shot job has no --rounds
        main(["run", "one-shot", "--rounds", "2"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: unrecognized arguments: --rounds 2 (flare-lora run one-shot --help")
    assert main(["report", "/nonexistent"]) == 2 and "metrics.json" in one_error_line(capsys)


def test_results_never_replace_a_folder_flare_lora_did_not_write(tmp_path, monkeypatch, capsys, tiny_model_dir):
    """--results holding someone's files, or the current folder: refused before the job runs, nothing
    deleted; an earlier results folder (marked) is replaced only with --overwrite."""
    foreign = tmp_path / "reports"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("mine")
    run = ["run", "flora", "--model", str(tiny_model_dir), "--ranks", "2"]
    assert main([*run, "--results", str(foreign)]) == 2
    assert "holds files flare-lora did not write (['thesis.docx'])" in one_error_line(capsys)
    monkeypatch.chdir(foreign)
    assert main([*run, "--results", "."]) == 2 and "is the current folder" in one_error_line(capsys)
    assert (foreign / "thesis.docx").read_text() == "mine"
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / ".flare_lora_results").touch()
    (earlier / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match="holds an earlier run's results; pass --overwrite"):
        check_results_dir(str(earlier))  # never replaced unasked
    check_results_dir(str(earlier), overwrite=True)  # flare-lora's own (an earlier version's empty marker)
    check_results_dir(str(tmp_path / "new"))
    mark_results(str(earlier))  # a run lists what it wrote; a file the user adds later is theirs
    (earlier / "my_notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"did not write \(\['my_notes.txt'\]\)"):
        check_results_dir(str(earlier), overwrite=True)
    (earlier / "my_notes.txt").unlink()
    (earlier / "adapter").mkdir()
    (earlier / "adapter" / "mine.txt").write_text("mine")  # inside a folder a run could have written
    with pytest.raises(ValueError, match=r"did not write \(\['adapter/mine.txt'\]\)"):
        check_results_dir(str(earlier), overwrite=True)


def test_export_writes_the_job_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nvflare's default --export-dir: ./fl_job
    assert main(["export", "one-shot", "--ranks", "2,4", "--no-byoc", "--min-sites", "1"]) == 0
    meta = json.loads((tmp_path / "fl_job" / "one_shot_flora" / "meta.json").read_text())
    assert sorted(meta["deploy_map"]) == ["app_server", "app_site-1", "app_site-2"]
    assert "fl_job/one_shot_flora" in capsys.readouterr().out


def test_options_of_a_run_here_are_refused_at_export(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for option in (["--overwrite"], ["--log-level", "full"], ["-v"]):
        assert main(["export", "flora", "--ranks", "2", *option]) == 2
        assert one_error_line(capsys).endswith("applies to a run on this machine, not to an exported job")
    assert not (tmp_path / "fl_job").exists()


def test_results_log_cannot_name_a_model_outside_the_results(tmp_path, capsys):
    """metrics.json comes from the server (job code): a path it names for the model is not followed,
    neither to write the model card nor to load or merge the model."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "README.md").write_text("mine")
    (victim / "adapter_config.json").write_text("{}")
    server = tmp_path / "ws" / "server" / "flare_lora"
    server.mkdir(parents=True)
    (server / "metrics.json").write_text(json.dumps({"adapter": str(victim), "final": {"sites": {}}}))
    log = collect_results(str(tmp_path / "ws"), str(tmp_path / "results"))
    assert "adapter" not in log and "expected 'adapter': ignored" in capsys.readouterr().out
    describe_results(str(tmp_path / "results"), {**log, "adapter": str(victim)}, {"model": "x", "job": "j"})
    assert (victim / "README.md").read_text() == "mine" and (victim / "adapter_config.json").read_text() == "{}"
    with pytest.raises(FileNotFoundError, match="holds no trained model"):
        flare_lora.load(str(tmp_path / "results"))


def test_report_prints_the_table_and_writes_plots(tmp_path, capsys):
    site = {"metrics": {"eval_loss": 1.5, "exact_match": 0.25}, "train": {"train_loss": 2.0},
            "upload_bytes": 2_000_000, "download_bytes": 0}
    log = {"rounds": [{"round": 0, "sites": {"site-1": site}}],
           "final": {"round": 1, "sites": {"site-1": {"metrics": {"eval_loss": 0.5, "exact_match": 0.75}}}}}
    (tmp_path / "metrics.json").write_text(json.dumps(log))
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "round  site" in out and "0.750" in out and "total upload 2.00 MB" in out
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "table.txt").read_text().startswith("round")


@pytest.mark.e2e  # a fresh interpreter that imports nvflare and torch: seconds to tens of seconds
def test_job_script_with_an_interpreter_off_path_exports_for_the_sites_python(tmp_path):
    """``/venv/bin/python nvflare_jobs/one_shot/job.py --export ...`` with that venv not on PATH:
    nvflare takes --export/--export-dir out of the command line, the job's own parser the rest,
    and the exported sites start training with --site-python."""
    out = tmp_path / "job"
    cmd = [sys.executable, str(ROOT / "nvflare_jobs" / "one_shot" / "job.py"), "--export", "--export-dir", str(out),
           "--ranks", "2", "--no-byoc", "--site-python", "/opt/site/bin/python"]
    env = dict(os.environ, PATH="/usr/bin:/bin", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = json.loads((out / "one_shot_flora" / "app_site-1" / "config" / "config_fed_client.json").read_text())
    command = client["executors"][0]["executor"]["args"]["command"]
    assert command[:4] == ["/opt/site/bin/python", "-u", "-m", "flare_lora.components.flare.client_train"], command
