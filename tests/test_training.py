"""Client learner: config validation, LoRA plumbing, the train/eval loop and model resolution.

Everything runs on a tiny random Llama with the real SmolLM2 tokenizer; GGUF conversion is
checked on a tiny float32 GGUF written here, so CI never pays the ~25 s default-model conversion.
"""

import copy
import os
import threading

import gguf
import numpy as np
import pytest
import torch
from conftest import TOKENIZER_DIR
from transformers import LlamaForCausalLM

from flare_lora.components.algorithms.merge import merge_lora_into
from flare_lora.components.data.prompts import collate, encode
from flare_lora.components.training.config import ConfigError, SiteConfig
from flare_lora.components.training.lora import add_lora, base_weights, load_lora_state, lora_state, reset_lora
from flare_lora.components.training.models import load_model_and_tokenizer, resolve_model_dir
from flare_lora.components.training.trainer import evaluate, set_threads, train_lora

RECORDS = [
    {"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b)}
    for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (6, 3), (7, 0), (4, 4), (1, 1)]
]


@pytest.fixture
def peft_model(tiny_model_dir):
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    return add_lora(model, SiteConfig(), "site-1"), tokenizer


# --- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value",
    [
        ("rank", 0),
        ("rank", 2.5),
        ("rank", "8"),
        ("rank", True),
        ("alpha", 0),
        ("alpha", -1.0),
        ("lr", 0.0),
        ("local_steps", 0),
        ("batch_size", 0),
        ("target_modules", []),
        ("dropout", 1.0),
        ("dtype", "bf16"),
        ("gradient_checkpointing", "yes"),
        ("bogus", 1),
    ],
)
def test_config_rejects_bad_value_naming_site_and_key(key, value):
    with pytest.raises(ConfigError, match=rf"site 'site-2': key '{key}': expected .*, got"):
        SiteConfig.from_dict({key: value}, "site-2")


def test_config_roundtrip_and_scaling():
    cfg = SiteConfig.from_dict({"rank": 4, "alpha": 8, "target_modules": ["q_proj"]}, "s")
    assert cfg.scaling == 2.0
    assert SiteConfig.from_dict(cfg.to_dict(), "s") == cfg


# --- LoRA ---------------------------------------------------------------------------------


def test_add_lora_unknown_target_names_it(tiny_model_dir):
    model, _ = load_model_and_tokenizer(tiny_model_dir)
    with pytest.raises(ConfigError, match=r"site 'site-3': key 'target_modules'.*q_proj.*got 'qq_proj'"):
        add_lora(model, SiteConfig(target_modules=["q_proj", "qq_proj"]), "site-3")


def test_only_lora_trainable(peft_model):
    model, _ = peft_model
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_reset_lora_is_deterministic(peft_model):
    model, _ = peft_model
    reset_lora(model, 7)
    first = lora_state(model)
    reset_lora(model, 8)
    assert any(not torch.equal(first[k], v) for k, v in lora_state(model).items())
    reset_lora(model, 7)
    again = lora_state(model)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert all(v.abs().sum() == 0 for k, v in again.items() if "lora_B" in k)


def test_zero_pad_sites_start_from_one_matrix_and_install_their_own_modules(tiny_model_dir):
    """HetLoRA: every site's fresh A is a prefix of one matrix per module whatever its rank and
    module set; after a zero-pad round a site with fewer modules installs only its own, and a
    module one site adapts is that site's update (weights normalised over the module's sites)."""
    from flare_lora.components.algorithms.averaging import zero_pad
    from flare_lora.components.strategies import get_method

    def site(rank, modules):
        model, _ = load_model_and_tokenizer(tiny_model_dir)
        return add_lora(model, SiteConfig(rank=rank, alpha=2.0 * rank, target_modules=modules), "s")

    small, big = site(2, ["q_proj"]), site(8, ["q_proj", "v_proj"])
    for model in (small, big):
        reset_lora(model, 11)
    s_state, b_state = lora_state(small), lora_state(big)
    a_keys = [k for k in b_state if k.endswith("lora_A.weight")]
    assert any("v_proj" in k for k in a_keys) and all(k in s_state for k in a_keys if "q_proj" in k)
    for key in a_keys:
        if key in s_state:
            assert torch.equal(s_state[key], b_state[key][:2]), key

    generator = torch.Generator().manual_seed(0)
    trained = [{k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in st.items()}
               for st in (s_state, b_state)]
    glob = zero_pad(trained, [1.0, 3.0], [2.0, 2.0])
    v_key = next(k for k in a_keys if "v_proj" in k)
    torch.testing.assert_close(glob[v_key], trained[1][v_key])  # p = 1 over the one site with v_proj
    method = get_method("zero_pad")
    method.install(small, glob, 1, seed=0)  # v_proj is not the small site's: not installed, no error
    assert lora_state(small).keys() == s_state.keys()
    method.install(big, glob, 1, seed=0)
    torch.testing.assert_close(lora_state(big)[v_key], trained[1][v_key])


def test_load_lora_state_is_strict(peft_model):
    model, _ = peft_model
    state = lora_state(model)
    key = next(iter(state))
    with pytest.raises(ValueError, match="missing keys.*" + key.replace(".", r"\.")):
        load_lora_state(model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="shape mismatches.*expected"):
        load_lora_state(model, {**state, key: torch.zeros(1, 1)})


def test_merge_into_base_weights_equals_peft_merge(peft_model):
    model, tokenizer = peft_model
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) * 0.1 for k, v in lora_state(model).items()}
    load_lora_state(model, state)
    inputs = tokenizer(["The capital of France is", "Two plus two"], return_tensors="pt", padding=True)
    expected = copy.deepcopy(model).merge_and_unload()(**inputs).logits

    merge_lora_into(base_weights(model), state, SiteConfig().scaling)  # in place, via live tensors
    with model.disable_adapter():
        merged = model(**inputs).logits
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=0)


# --- train / evaluate ---------------------------------------------------------------------


def test_train_lora_reduces_loss_deterministically(tiny_model_dir):
    cfg = SiteConfig(lr=1e-2, local_steps=20, grad_accum=2, seed=3)
    results, states = [], []
    for _ in range(2):
        model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
        model = add_lora(model, cfg)
        before = evaluate(model, tokenizer, RECORDS, cfg)["eval_loss"]
        results.append(train_lora(model, tokenizer, RECORDS, cfg))
        states.append(lora_state(model))
    after = evaluate(model, tokenizer, RECORDS, cfg)["eval_loss"]
    assert after < before - 0.1
    assert not model.training
    assert results[0]["steps"] == 20 and results[0]["tokens"] == 20 * 2 * 4 * 2  # digit + eos
    assert results[0]["train_loss"] == results[1]["train_loss"]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_bf16_base_with_gradient_checkpointing_trains_float32_lora_like_without(tiny_model_dir):
    """The memory switches of docs/production.md: a bfloat16 base (the LoRA factors stay float32)
    with activations recomputed in the backward pass trains exactly as without recomputation, and
    FLoRA merges rounds into the bfloat16 base reproducibly (sites keep identical weights)."""
    from flare_lora.components.algorithms.merge import weights_digest
    from flare_lora.components.flare.client_train import load_model
    from flare_lora.components.strategies import FLoRA, pack_rounds

    cfg = SiteConfig(lr=1e-2, local_steps=4, seed=3, dtype="bfloat16")
    runs = []
    for checkpointing in (False, True):
        site = SiteConfig.from_dict({**cfg.to_dict(), "gradient_checkpointing": checkpointing}, "site-1")
        model, tokenizer = load_model(tiny_model_dir, site)
        assert model.is_gradient_checkpointing == checkpointing
        model = add_lora(model, site)
        before = lora_state(model)
        stats = train_lora(model, tokenizer, RECORDS, site)
        runs.append((stats["train_loss"], lora_state(model), model))
    (loss, state, _), (loss_ckpt, state_ckpt, model) = runs
    assert loss == loss_ckpt and all(torch.equal(state[k], state_ckpt[k]) for k in state)
    assert all(v.dtype == torch.float32 for v in state.values()) and any(not torch.equal(state[k], before[k]) for k in state)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}

    rounds = pack_rounds({0: state, 1: state_ckpt})
    digests = []
    for _ in range(2):  # two sites catching up on the same rounds
        site_model = add_lora(load_model(tiny_model_dir, cfg)[0], cfg)
        assert FLoRA().install(site_model, rounds, 0, seed=1) == 2
        digests.append(weights_digest(base_weights(site_model)))
    assert digests[0] == digests[1]
    assert digests[0] != weights_digest(base_weights(add_lora(load_model(tiny_model_dir, cfg)[0], cfg)))


def test_gradient_checkpointing_is_refused_with_dp_sgd():
    with pytest.raises(ConfigError, match="site 's': key 'gradient_checkpointing': expected false with DP-SGD"):
        SiteConfig.from_dict({"gradient_checkpointing": True, "dp_noise_multiplier": 1.0}, "s")


def test_set_threads():
    set_threads(None)
    assert torch.get_num_threads() == 1  # conftest's setting left alone
    set_threads(2)
    set_threads(2)  # the inter-op count can only be set once: the second call must not fail
    assert torch.get_num_threads() == 2
    set_threads(1)


def test_evaluate_reports_token_weighted_loss_and_exact_match(peft_model):
    model, tokenizer = peft_model
    cfg = SiteConfig(eval_batch_size=3, max_new_tokens=2)
    result = evaluate(model, tokenizer, RECORDS, cfg)
    assert set(result) == {"eval_loss", "perplexity", "n", "exact_match"}
    assert result["n"] == 8 and 0.0 <= result["exact_match"] <= 1.0
    batch = collate([encode(tokenizer, r, cfg.max_length) for r in RECORDS], tokenizer.pad_token_id)
    with torch.no_grad():
        reference = model(**batch).loss.item()  # HF's mean over all supervised tokens
    assert result["eval_loss"] == pytest.approx(reference, rel=1e-5)
    assert evaluate(model, tokenizer, [{"text": "plain text"}] + RECORDS, SiteConfig(max_eval=1)).keys() == {
        "eval_loss", "perplexity", "n"
    }


# --- model resolution ---------------------------------------------------------------------


def test_resolve_missing_dir_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"model directory not found: {tmp_path}/nope"):
        resolve_model_dir(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_model_dir("some-org/some-model")


def test_resolve_dir_without_weights_or_config(tmp_path, tiny_model_dir):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} has no weights"):
        resolve_model_dir(str(tmp_path))
    (tmp_path / "config.json").unlink()
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} has weights but no config.json"):
        resolve_model_dir(str(tmp_path))
    assert resolve_model_dir(tiny_model_dir) == tiny_model_dir


def _write_gguf(model: LlamaForCausalLM, path) -> None:
    """Float32 GGUF as llama.cpp's converter writes it (q/k rows permuted for its rope layout)."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_vocab_size(c.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":  # tied to the embedding
            continue
        x = value.numpy()
        n = next((h for proj, h in heads.items() if proj in key), None)
        if n:
            x = x.reshape(n, 2, x.shape[0] // n // 2, x.shape[1]).swapaxes(1, 2).reshape(x.shape)
        writer.add_tensor(names.get_name(key, try_suffixes=(".weight",)), np.ascontiguousarray(x))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_dir_converts_once_exactly(tmp_path, tiny_model_dir):
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    src = tmp_path / "src"
    src.mkdir()
    _write_gguf(model, src / "tiny.gguf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.symlink(TOKENIZER_DIR / name, src / name)

    results, errors = [], []

    def resolve():  # two "sites" at once: one converts, the other waits on the lock
        try:
            results.append(resolve_model_dir(str(src), cache_dir=str(tmp_path / "cache")))
        except Exception as exc:  # surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=resolve) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    cache = results[0]
    assert os.path.basename(cache) == f"tiny-{(src / 'tiny.gguf').stat().st_size}"
    name = os.path.basename(cache)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [name, name + ".lock"]  # no temp dirs

    converted, tokenizer = load_model_and_tokenizer(cache)
    assert "quantization_config" not in converted.config.to_dict()
    expected, got = model.state_dict(), converted.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert tokenizer("hi").input_ids == load_model_and_tokenizer(tiny_model_dir)[1]("hi").input_ids
