"""Optional extras: a site or submitting machine without Opacus, TenSEAL or matplotlib runs jobs that
need none of them, and a job that needs one is refused with one line naming the extra.

"Not installed" is real for every process of the job: a sitecustomize on PYTHONPATH (which the
simulator's site processes inherit) makes importing those packages fail, as on a machine without them."""

import os
import subprocess
import sys

import pytest
from sim_jobs import FLORA_JOB

BLOCK = '''
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("opacus", "tenseal", "matplotlib"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _Absent())
'''


def run(tmp_path, model, *args):
    (tmp_path / "absent").mkdir(exist_ok=True)
    (tmp_path / "absent" / "sitecustomize.py").write_text(BLOCK)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(tmp_path / "absent"))
    cmd = [sys.executable, str(FLORA_JOB), "--model", str(model), "--workspace", str(tmp_path / "ws"),
           "--results", str(tmp_path / "results"), "--steps", "1", "--batch-size", "2", "--threads", "1",
           "--ranks", "2,2", "--rounds", "1", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.e2e
def test_a_job_without_dp_he_or_plots_runs_where_those_are_not_installed(tmp_path, tiny_model_dir):
    done = run(tmp_path, tiny_model_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert 'curves.png not written: matplotlib is not installed: pip install "flare-lora[report]"' in done.stdout
    assert (tmp_path / "results" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "results" / "curves.png").exists()


@pytest.mark.parametrize("option, extra", [(["--dp-noise-multiplier", "1.0"], "dp"), (["--he"], "he"),
                                           (["--client-dp-clip", "0.1", "--client-dp-sigma", "1.0"], "dp")])
def test_a_job_needing_a_missing_extra_is_refused_naming_it(tmp_path, tiny_model_dir, option, extra):
    done = run(tmp_path, tiny_model_dir, *option)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f'pip install "flare-lora[{extra}]"' in lines[0], lines
    assert not (tmp_path / "ws").exists() or not any((tmp_path / "ws").rglob("log.txt"))  # nothing started
