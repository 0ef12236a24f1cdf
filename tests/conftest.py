"""Shared fixtures: an offline, single-threaded environment and a tiny random Llama."""

import filecmp
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests must never reach the hub
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402
import torch  # noqa: E402

import flare_lora.components  # noqa: E402
from flare_lora.components.training.models import make_tiny_llama  # noqa: E402

CHECKOUT = Path(__file__).resolve().parents[1]


def _stale_installed_files() -> list[str]:
    """Modules in which the installed flare_lora and the checkout differ (pyproject.toml: the
    package is installed as a wheel, so an edit needs `pip install .` before the tests; a
    module deleted here but still installed counts too)."""
    installed = Path(flare_lora.components.__file__).resolve().parents[1]
    top = CHECKOUT / "components" / "top_level" / "__init__.py"  # installed as flare_lora/__init__.py
    stale = [] if (installed / "__init__.py").is_file() and filecmp.cmp(top, installed / "__init__.py", shallow=False) \
        else ["flare_lora/__init__.py"]
    for folder in ("components", "privacy"):
        here = {p.relative_to(CHECKOUT / folder) for p in (CHECKOUT / folder).rglob("*.py")
                if not p.is_relative_to(top.parent)}
        there = {p.relative_to(installed / folder) for p in (installed / folder).rglob("*.py")}
        for rel in sorted(here | there):
            src, dst = CHECKOUT / folder / rel, installed / folder / rel
            if not (src.is_file() and dst.is_file() and filecmp.cmp(src, dst, shallow=False)):
                stale.append(f"{folder}/{rel}")
    return stale


def pytest_configure(config):
    if hasattr(config, "workerinput"):  # xdist workers: the controller checked once, before they started
        return
    stale = _stale_installed_files()
    if stale:
        pytest.exit(f"the installed flare_lora is not this checkout ({len(stale)} file(s) differ, e.g. "
                    f"{stale[0]}): run `pip install .` first", returncode=4)

torch.set_num_threads(1)  # CI workers share a few cores

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TOKENIZER_DIR = SHARED_DATA / "smollm2-135m-instruct-q4_1"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer, 64-wide Llama with SmolLM2's tokenizer, saved as safetensors."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), TOKENIZER_DIR)
