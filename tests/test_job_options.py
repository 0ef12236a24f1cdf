"""No job option is accepted and then ignored: each one is honoured or refused with an error.

For every option of every job (read from the job's argparse parser, not its --help text), the job
is exported in-process exactly as ``flare-lora export JOB`` does (``job_main(..., export=True)``)
with a non-default value, and either the export fails with exit 2 and one error line naming the
option, or the exported job config differs from the export without that value. Options that only
shape a run on this machine are in LOCAL_ONLY with the reason; the expected refusals are in
REFUSED with the reason. Most cases start from a job without code (--no-byoc): its export writes
only config, so the whole walk takes seconds.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest

from flare_lora.components.cli.main import JOBS, job_main
from flare_lora.components.cli.lora_job import FEDCDD_KEYS

pytestmark = pytest.mark.e2e  # ~200 in-process exports: tens of seconds

SITE_SCRIPT = Path(__file__).resolve().parent / "sites" / "bad_site.py"
MMLU = Path(__file__).resolve().parents[2] / "shared" / "data" / "mmlu"

LOCAL_ONLY = {  # option -> why an exported job is the same with it
    "--env": "where this machine runs the job; an exported job runs wherever it is submitted",
    "--workspace": "the simulator's / POC's folder on this machine",
    "--startup-kit": "the admin kit this machine submits with (--env prod)",
    "--site-local": "files the POC harness puts into its sites' local/ folders, not part of the job",
    "--results": "where this machine copies the results after a run",
    "--save-merged": "merges the results on this machine after a run",
    "--overwrite": "lets this machine replace an earlier run's results after a run",
    "--log-level": "the simulator's console on this machine (refused with --env poc/prod)",
    "-v": "--log-level full",
}
REFUSED = {  # (job, option) -> why that job refuses it
    **{("flora", f"--fedcdd-{key}"): "FedCDD's own options need --method fedcdd"
       for key in FEDCDD_KEYS},
    ("fedcdd", "--he"): "FedCDD's aggregation is nonlinear: ciphertexts cannot be aggregated by it",
    ("fedcdd", "--global-rank"): "the global's rank is an option of flora (bounded global) and hlora",
    ("fedcdd", "--global-energy"): "a bounded global is an option of flora",
    ("one-shot", "--checkpoint-dir"): "one round: no round to checkpoint or resume after",
    ("one-shot", "--task-timeout"): "--deadline, --late-grace and --timeout end the one round",
    ("selective", "--max-update-norm"): "results are whole layers, not LoRA factors of the target modules",
    ("selective", "--model-config"): "results are whole layers, pinned to the global's layer keys and shapes",
}
WITH_CODE = {"--no-byoc", "--in-process", "--site-script"}  # need a job that carries code (the base has --no-byoc)


def values(data: Path, site_config: Path, other_model: Path) -> dict[str, tuple[list[str], list[str]]]:
    """option -> (base arguments it needs besides the job's base, the option with its value)."""
    dp = ["--dp-noise-multiplier", "1.0"]
    client_dp = ["--client-dp-clip", "0.1", "--client-dp-sigma", "1.0"]
    mask = ["--mask-rho", "0.5"]
    mc = ["--eval", str(MMLU)]
    return {
        "--tracking": ([], ["--tracking", "none"]), "--eval": ([], mc), "--eval-shots": (mc, ["--eval-shots", "5"]), "--eval-limit": (mc, ["--eval-limit", "2"]),
        "--eval-style": (mc, ["--eval-style", "cloze"]),
        "--ranks": ([], ["--ranks", "4,4"]), "--alpha-ratio": ([], ["--alpha-ratio", "4"]),
        "--target-modules": ([], ["--target-modules", "q_proj"]), "--steps": ([], ["--steps", "7"]),
        "--lr": ([], ["--lr", "0.01"]), "--batch-size": ([], ["--batch-size", "7"]),
        "--threads": ([], ["--threads", "7"]), "--site-config": ([], ["--site-config", str(site_config)]),
        "--rounds": ([], ["--rounds", "5"]), "--min-clients": ([], ["--min-clients", "1"]),
        "--clients-per-round": ([], ["--clients-per-round", "1"]), "--model": ([], ["--model", str(other_model)]),
        "--data": ([], ["--data", str(data)]), "--seed": ([], ["--seed", "7"]),
        "--max-trainer-restarts": ([], ["--max-trainer-restarts", "0"]),
        "--site-script": ([], ["--site-script", f"site-1={SITE_SCRIPT}"]),
        "--site-python": ([], ["--site-python", "/opt/site-venv/bin/python"]),
        "--dp-epsilon": ([], ["--dp-epsilon", "8"]), "--dp-noise-multiplier": ([], dp),
        "--dp-delta": (dp, ["--dp-delta", "1e-6"]), "--dp-max-grad-norm": (dp, ["--dp-max-grad-norm", "0.5"]),
        "--dp-epsilon-max": (dp, ["--dp-epsilon-max", "50"]), "--dp-accountant": (dp, ["--dp-accountant", "prv"]),
        "--dp-clipping": (dp, ["--dp-clipping", "ghost"]),
        "--client-dp-clip": (client_dp, ["--client-dp-clip", "0.2"]),
        "--client-dp-sigma": (client_dp, ["--client-dp-sigma", "2.0"]),
        "--client-dp-delta": (client_dp, ["--client-dp-delta", "1e-6"]),
        "--client-dp-epsilon-max": (client_dp, ["--client-dp-epsilon-max", "50"]),
        "--checkpoint-dir": ([], ["--checkpoint-dir", "ckpt"]), "--max-result-mb": ([], ["--max-result-mb", "1.5"]),
        "--task-timeout": ([], ["--task-timeout", "60"]), "--ddp": ([], ["--ddp", "2"]),
        "--name": ([], ["--name", "renamed"]), "--fedcdd-temperature": ([], ["--fedcdd-temperature", "0.5"]),
        "--global-rank": ([], ["--global-rank", "4"]), "--global-energy": ([], ["--global-energy", "0.9"]),
        "--mask-rho": ([], mask), "--mask-sigma": (mask, ["--mask-sigma", "0.01"]),
        "--mask-mode": (mask, ["--mask-mode", "perturb"]), "--mask-importance": (mask, ["--mask-importance", "column"]),
        "--min-sites": ([], ["--min-sites", "1"]), "--deadline": ([], ["--deadline", "600"]),
        "--late-grace": ([], ["--late-grace", "30"]), "--timeout": ([], ["--timeout", "7200"]),
        "--budgets": ([], ["--budgets", "1,2"]), "--lam": ([], ["--lam", "0.5"]), "--sel-gap": ([], ["--sel-gap", "2"]),
        "--score-batches": ([], ["--score-batches", "3"]), "--costs": ([], ["--costs", "1,1"]),
        "--rank": ([], ["--rank", "4"]), "--sites": ([], ["--sites", "hospital-a,hospital-b"]),
        "--max-examples": ([], ["--max-examples", "500"]), "--max-update-norm": ([], ["--max-update-norm", "10"]),
        # a logical --model leaves the shapes unpinned; --model-config pins them
        "--model-config": (["--model", "tiny-llama"], ["--model-config", str(other_model)]),
    }


def job_base(job: str, flag: str, model: str) -> list[str]:
    sites = ["--budgets", "1,1", "--rank", "2"] if job == "selective" else ["--ranks", "2,2"]
    if job == "selective" and flag.startswith(("--dp-", "--client-dp-")):  # DP sites withhold layer scores: a selection reading none
        sites += ["--selection", "top"]
    return [*sites, "--model", model]


def options(job: str) -> list:
    """The job's options as its parser has them (argparse keeps no public list)."""
    module, defaults = JOBS[job]
    parser = importlib.import_module(f"flare_lora.components.cli.{module}").parser(None, **defaults)
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def option_args(action, table: dict) -> tuple[list[str], list[str]]:
    flag = action.option_strings[-1]
    if flag in table:
        return table[flag]
    if action.nargs == 0:  # a switch
        return [], [flag]
    assert action.choices, f"{flag}: no value to try; add one to values()"
    return [], [flag, [c for c in action.choices if c != action.default][-1]]


def export(job: str, argv: list[str], where: Path, monkeypatch, capsys) -> tuple[int, str, dict]:
    """(exit status, stderr, {file: content} of the exported job's config files)."""
    where.mkdir(parents=True)
    monkeypatch.chdir(where)  # nvflare's default --export-dir: ./fl_job
    capsys.readouterr()
    rc = job_main(job, argv, export=True)
    err = capsys.readouterr().err
    configs = {}
    for path in sorted(where.glob("fl_job/*/**/*.json")):
        rel = path.relative_to(where / "fl_job").parts
        if "custom" not in rel:
            configs[str(Path(*rel[1:]))] = json.loads(path.read_text())  # without the job's folder: --name renames it
    return rc, err, configs


CASES = [(job, action.option_strings[-1]) for job in JOBS for action in options(job)
         if action.option_strings[-1] not in LOCAL_ONLY]
_baselines: dict = {}


@pytest.fixture(scope="module")
def table(tmp_path_factory, tiny_model_dir) -> dict:
    """values() with real files: two sites' data, a site-config file, a second model folder."""
    tmp = tmp_path_factory.mktemp("inputs")
    (tmp / "data").mkdir()
    for site in ("site-1", "site-2"):
        records = [{"instruction": f"say {i}", "output": str(i)} for i in range(5)]
        (tmp / "data" / f"{site}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp / "sites.json").write_text(json.dumps({"site-1": {"lr": 0.01}}))
    shutil.copytree(tiny_model_dir, tmp / "other-model")
    return values(tmp / "data", tmp / "sites.json", tmp / "other-model")


@pytest.mark.parametrize("job,flag", CASES, ids=[f"{job}{flag}" for job, flag in CASES])
def test_option_is_honoured_or_refused(job, flag, table, tiny_model_dir, tmp_path, monkeypatch, capsys):
    action = next(a for a in options(job) if a.option_strings[-1] == flag)
    extra, given = option_args(action, table)
    base = job_base(job, flag, tiny_model_dir) + extra + ([] if flag in WITH_CODE else ["--no-byoc"])
    key = (job, tuple(base))
    if key not in _baselines:
        _baselines[key] = export(job, base, tmp_path / "base", monkeypatch, capsys)
    rc, err, default = _baselines[key]
    assert rc == 0, f"{job} {base}: {err}"

    rc, err, configs = export(job, base + given, tmp_path / "case", monkeypatch, capsys)
    if (job, flag) in REFUSED:
        assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert flag in err or action.dest in err, f"{flag} refused without naming it: {err}"
    else:
        assert rc == 0, f"{flag} refused: {err}"
        assert configs != default, f"{job}: {' '.join(given)} exported the same job as without it"


def test_every_option_is_walked_or_local():
    """The walk covers each job's parser: a new option needs a value in values() (or is a switch
    or has choices), or a LOCAL_ONLY reason; a stale entry in a table fails too."""
    every = {a.option_strings[-1] for job in JOBS for a in options(job)}
    walked = {flag for _, flag in CASES}
    assert set(LOCAL_ONLY) <= every and {flag for _, flag in REFUSED} <= walked
    assert set(values(Path("data"), Path("sites.json"), Path("model"))) <= every
