"""Shared fixtures: an offline, single-threaded environment and a tiny random Llama."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests must never reach the hub
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402
import torch  # noqa: E402

from components.training.models import make_tiny_llama  # noqa: E402

torch.set_num_threads(1)  # CI workers share a few cores

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TOKENIZER_DIR = SHARED_DATA / "smollm2-135m-instruct-q4_1"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer, 64-wide Llama with SmolLM2's tokenizer, saved as safetensors."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), TOKENIZER_DIR)
