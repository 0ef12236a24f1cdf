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
    """Checkout files the installed flare_lora lacks or holds in another version (pyproject.toml:
    the package is installed as a wheel, so an edit needs `pip install .` before the tests)."""
    installed = Path(flare_lora.components.__file__).resolve().parents[1]
    stale = []
    for folder in ("components", "privacy"):
        for src in (CHECKOUT / folder).rglob("*.py"):
            dst = installed / folder / src.relative_to(CHECKOUT / folder)
            if not dst.is_file() or not filecmp.cmp(src, dst, shallow=False):
                stale.append(str(src.relative_to(CHECKOUT)))
    return stale


def pytest_configure(config):
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
