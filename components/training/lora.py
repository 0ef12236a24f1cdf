"""Attach, re-initialise, export and import the LoRA adapter, and expose the base weights.

State dicts use PEFT's key layout (see docs/design.md), which is what every aggregation rule in
``flare_lora.components.algorithms`` consumes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from flare_lora.components.algorithms.lora_init import fresh_lora_a
from flare_lora.components.algorithms.lora_state import InvalidUpdate, targeted, check_tensor, lora_module_shapes, validate_lora_update
from flare_lora.components.algorithms.merge import BASE_PREFIX
from flare_lora.components.training.config import ConfigError, SiteConfig


def add_lora(model: nn.Module, cfg: SiteConfig, site: str = "") -> PeftModel:
    """Wrap ``model`` with a LoRA adapter (only its factors trainable), initialised from cfg.seed.

    Target names are checked first: PEFT's own error for a typo does not list what exists.
    """
    paths = [name for name, _ in model.named_modules()]
    for target in cfg.target_modules:
        if not any(targeted(path, [target]) for path in paths):
            linear = (name for name, module in model.named_modules() if isinstance(module, nn.Linear))
            available = sorted({name.rsplit(".", 1)[-1] for name in linear})
            raise ConfigError(
                f"site {site!r}: key 'target_modules': expected names of linear modules "
                f"{available}, got {target!r}"
            )
    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        target_modules=list(cfg.target_modules),
        lora_dropout=cfg.dropout,
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )
    peft_model = get_peft_model(model, config)
    reset_lora(peft_model, cfg.seed)
    return peft_model


def reset_lora(peft_model: PeftModel, seed: int, prefixes=None) -> None:
    """Fresh adapter as PEFT initialises it (A kaiming-uniform, B zero), each module's A from the seed
    and its name (components/algorithms/lora_init.py); only the modules in ``prefixes`` when given.

    FLoRA trains a new LoRA every round on the merged base; private generators keep the global RNG
    untouched.
    """
    with torch.no_grad():
        for prefix, module in peft_model.named_modules():
            if isinstance(module, LoraLayer) and (prefixes is None or prefix in prefixes):
                for name in module.lora_A:
                    weight = module.lora_A[name].weight
                    weight.copy_(fresh_lora_a(seed, prefix, tuple(weight.shape)))
                    nn.init.zeros_(module.lora_B[name].weight)


def freeze_lora_a(peft_model: PeftModel) -> None:
    """Only the B factors train (shared-A: every site's A is the round's shared draw)."""
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for layer in module.lora_A.values():
                layer.weight.requires_grad_(False)


def lora_state(peft_model: PeftModel) -> dict[str, Tensor]:
    """The adapter's factors in PEFT key layout, as detached float32 CPU copies."""
    state = get_peft_model_state_dict(peft_model)
    return {key: value.detach().to("cpu", torch.float32).clone() for key, value in state.items()}


def linear_shapes(peft_model: nn.Module, prefixes) -> dict[str, tuple[int, int]]:
    """{prefix: (out, in)} of the base model's linear layers named by LoRA module ``prefixes``;
    InvalidUpdate naming a prefix that is not one."""
    base = peft_model.get_base_model() if isinstance(peft_model, PeftModel) else peft_model
    modules = dict(base.named_modules())
    shapes = {}
    for prefix in prefixes:
        module = modules.get(prefix.removeprefix(BASE_PREFIX))
        layer = getattr(module, "base_layer", module)  # PEFT wraps the linear layers it adapts
        if not isinstance(layer, nn.Linear):
            raise InvalidUpdate(f"global module {prefix!r}: not a linear layer of this site's base model; refusing it")
        shapes[prefix] = (layer.out_features, layer.in_features)
    return shapes


def check_linear_modules(peft_model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """A site's own check before it merges global factors into its base weights: a well-formed,
    finite LoRA state whose every module is a linear layer of the base model with the factors'
    (out, in): a bad global is never merged into embeddings, norms or anything else."""
    validate_lora_update(state)
    found = linear_shapes(peft_model, lora_module_shapes(state))
    for prefix, shape in lora_module_shapes(state).items():
        if found[prefix] != shape:
            raise InvalidUpdate(f"global module {prefix!r}: not a linear layer of this site's base model with "
                                f"(out, in) = {shape}; refusing to merge it")


def load_lora_state(peft_model: PeftModel, state: dict[str, Tensor]) -> None:
    """Load adapter factors, requiring exactly the model's keys and shapes, all finite."""
    expected = get_peft_model_state_dict(peft_model)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = [
        f"{key}: expected {tuple(expected[key].shape)}, got {tuple(state[key].shape)}"
        for key in sorted(expected.keys() & state.keys())
        if expected[key].shape != state[key].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"LoRA state does not fit the model: missing keys {_few(missing)}, "
            f"unexpected keys {_few(unexpected)}, shape mismatches {_few(mismatched)}"
        )
    for key, value in state.items():
        check_tensor(key, value)
    set_peft_model_state_dict(peft_model, state)


def _few(items: list[str], shown: int = 3) -> str:
    """A readable excerpt: a 30-layer model has 120 LoRA keys."""
    return f"{items[:shown]}" + (f" and {len(items) - shown} more" if len(items) > shown else "")


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """Every trainable parameter (tied weights once), as detached float32 CPU copies: the upload
    of full-parameter fine-tuning."""
    return {
        name: p.detach().to("cpu", torch.float32).clone() for name, p in model.named_parameters() if p.requires_grad
    }


def load_full_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy weights into the model's parameters of the same names; unknown names or shapes raise."""
    params = dict(model.named_parameters())
    unknown = sorted(state.keys() - params.keys())
    mismatched = [
        f"{k}: expected {tuple(params[k].shape)}, got {tuple(v.shape)}"
        for k, v in state.items()
        if k in params and params[k].shape != v.shape
    ]
    if unknown or mismatched:
        raise ValueError(f"weights do not fit the model: unknown {_few(unknown)}, mismatched shapes {_few(mismatched)}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def base_weights(model: nn.Module) -> dict[str, Tensor]:
    """The base model's live parameters keyed by their path in the base model.

    PEFT moves a wrapped layer's weight to ``<path>.base_layer.weight``; it is returned as
    ``<path>.weight``, the key ``merge_lora_into`` derives from a LoRA prefix. In-place updates
    of the returned tensors change the model.
    """
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    weights = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        if any(part.startswith("lora_") for part in parts):
            continue
        weights[".".join(part for part in parts if part != "base_layer")] = param
    return weights


# --- selective-layer fine-tuning: per-decoder-layer parameters ---------------------------------
#
# Wire keys: "full" mode uses the base model's parameter names (``model.layers.3.mlp.up_proj.weight``);
# "lora" mode uses PEFT state-dict keys (``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``).
# Both carry the layer index that ``flare_lora.components.algorithms.layer_average.layer_of`` reads.

LAYER_MODES = ("full", "lora")


def _lora_wire_key(name: str, adapter: str = "default") -> str:
    """PEFT parameter name -> state-dict key (the adapter name is dropped, as PEFT does)."""
    return name.replace(f".lora_A.{adapter}.", ".lora_A.").replace(f".lora_B.{adapter}.", ".lora_B.")


def layer_parameters(model: nn.Module, mode: str) -> dict[int, dict[str, nn.Parameter]]:
    """{layer: {wire key: parameter}} for every decoder layer, the tensors a selective job trains.

    "full": every parameter of the block (attention, MLP, norms). "lora": the block's LoRA factors
    (``model`` must carry an adapter). Raises ValueError when the layers found are not 0..K-1 of
    the model's ``num_hidden_layers``.
    """
    from flare_lora.components.algorithms.layer_average import layer_of

    if mode not in LAYER_MODES:
        raise ValueError(f"mode: expected one of {list(LAYER_MODES)}, got {mode!r}")
    if mode == "lora" and not isinstance(model, PeftModel):
        raise ValueError("mode 'lora' needs a model with a LoRA adapter (add_lora)")
    out: dict[int, dict[str, nn.Parameter]] = {}
    for name, param in model.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        if is_lora != (mode == "lora"):
            continue
        layer = layer_of(name)
        if layer is None:
            continue
        key = _lora_wire_key(name) if is_lora else name.replace(".base_layer.", ".")
        out.setdefault(layer, {})[key] = param
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not out or (expected is not None and sorted(out) != list(range(expected))):
        raise ValueError(
            f"mode {mode!r}: expected parameters in decoder layers 0..{expected - 1 if expected else '?'}, "
            f"found layers {sorted(out)}"
        )
    return dict(sorted(out.items()))


def score_parameters(model: nn.Module, mode: str) -> dict[int, dict[str, nn.Parameter]]:
    """{layer: {name: parameter}} whose gradient scores a layer.

    "full": the block's weights (what full mode trains). "lora": the base weights of the modules
    the adapter targets: their gradient is what the layer's low-rank update approximates (a fresh
    adapter's own gradient is zero for A, since B = 0).
    """
    if mode == "full":
        return layer_parameters(model, "full")
    from flare_lora.components.algorithms.layer_average import layer_of
    from flare_lora.components.algorithms.merge import base_weight_name

    weights = base_weights(model)
    prefixes = {key.rsplit(".lora_", 1)[0] for layer in layer_parameters(model, "lora").values() for key in layer}
    out: dict[int, dict[str, nn.Parameter]] = {}
    for prefix in sorted(prefixes):
        name = base_weight_name(prefix)
        out.setdefault(layer_of(name), {})[name] = weights[name]
    return dict(sorted(out.items()))


def set_trainable_layers(model: nn.Module, layers, mode: str) -> int:
    """Only the given layers' tensors (of ``mode``) require grad; everything else is frozen.

    Returns the number of trainable elements.
    """
    chosen = {int(l) for l in layers}
    by_layer = layer_parameters(model, mode)
    for param in model.parameters():
        param.requires_grad_(False)
    count = 0
    for layer, params in by_layer.items():
        for param in params.values():
            param.requires_grad_(layer in chosen)
            count += param.numel() if layer in chosen else 0
    return count


def layer_state(model: nn.Module, layers, mode: str) -> dict[str, Tensor]:
    """The given layers' tensors keyed for the wire, as detached float32 CPU copies."""
    by_layer = layer_parameters(model, mode)
    return {
        key: param.detach().to("cpu", torch.float32).clone()
        for layer in sorted({int(l) for l in layers})
        for key, param in by_layer[layer].items()
    }


@torch.no_grad()
def load_layer_state(model: nn.Module, state: dict[str, Tensor], mode: str) -> None:
    """Copy wire-keyed layer tensors into the model; unknown keys or shapes raise ValueError."""
    params = {key: p for layer in layer_parameters(model, mode).values() for key, p in layer.items()}
    unknown = sorted(set(state) - set(params))
    mismatched = [
        f"{key}: expected {tuple(params[key].shape)}, got {tuple(state[key].shape)}"
        for key in sorted(set(state) & set(params))
        if params[key].shape != state[key].shape
    ]
    if unknown or mismatched:
        raise ValueError(f"layer state does not fit the model: unknown keys {_few(unknown)}, shape mismatches {_few(mismatched)}")
    for key, value in state.items():
        params[key].copy_(value.to(device=params[key].device, dtype=params[key].dtype))
