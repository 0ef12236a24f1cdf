"""Per-site training hyperparameters, validated where they enter (a job's config dict).

A bad value fails at job start with the site and key named, instead of as a shape error or a NaN
loss in the middle of a federated round.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields


class ConfigError(ValueError):
    """An invalid configuration value; the message names the site and key."""


DTYPES = ("float32", "bfloat16", "float16")  # the base model's dtype at a site


@dataclass
class SiteConfig:
    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    dropout: float = 0.0
    lr: float = 5e-4
    local_steps: int = 10
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 128
    eval_batch_size: int = 8
    max_new_tokens: int = 8
    threads: int | None = None
    seed: int = 0
    max_eval: int | None = None
    # multiple-choice evaluation each round (training/multiple_choice.py): an MMLU folder or JSONL at the site
    eval_mc: str | None = None
    eval_mc_shots: int = 0
    eval_mc_limit: int | None = None
    eval_mc_style: str = "letter"  # or "cloze" (multiple_choice.accuracy)
    # memory (docs/production.md section 5): the base model's dtype (LoRA factors stay float32) and
    # activation recomputation in the backward pass
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    # sample-level DP-SGD (privacy/dp_sgd.py, docs/dp.md): on when dp_epsilon or dp_noise_multiplier is set
    dp_epsilon: float | None = None  # target ε over dp_planned_steps (the recipe fills rounds x local_steps)
    dp_noise_multiplier: float | None = None  # or σ directly
    dp_delta: float | None = None  # default 1e-5; must be < 1 / (training records)
    dp_max_grad_norm: float | None = None  # per-record clipping norm C, default 1.0
    dp_accountant: str | None = None  # "rdp" (default) or "prv"
    dp_epsilon_max: float | None = None  # the site's budget over all its DP training
    dp_clipping: str | None = None  # Opacus mode: "hooks" (default), "functorch", "ghost", "fast"
    dp_planned_steps: int | None = None

    @property
    def dp(self) -> bool:
        """Sample-level DP-SGD requested."""
        return self.dp_epsilon is not None or self.dp_noise_multiplier is not None

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @property
    def scaling(self) -> float:
        """LoRA's s = alpha / rank: the factor on B @ A in the effective update."""
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, site: str) -> SiteConfig:
        """Build from a (possibly partial) dict, rejecting unknown keys and bad types or ranges."""
        if not isinstance(d, dict):
            raise ConfigError(f"site {site!r}: expected a dict of settings, got {d!r}")
        check_keys(d, _RULES, f"site {site!r}")
        cfg = cls(**{k: list(v) if k == "target_modules" else v for k, v in d.items()})
        _check_dp(cfg, site)
        return cfg


def check_keys(settings: dict, rules: dict, where: str) -> None:
    """Every key known (``rules``: key -> check returning None or what was expected) and valid;
    ConfigError starting with ``where`` otherwise."""
    for key, value in settings.items():
        if key not in rules:
            raise ConfigError(f"{where}: key {key!r}: expected one of {list(rules)}, got an unknown key")
        problem = rules[key](value)
        if problem:
            raise ConfigError(f"{where}: key {key!r}: expected {problem}, got {value!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(minimum: int, optional: bool = False):
    def check(v):
        if (v is None and optional) or (_is_int(v) and v >= minimum):
            return None
        return f"an integer >= {minimum}" + (" or null" if optional else "")
    return check


def positive(v):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf
    return None if ok else "a finite number > 0"


def _dropout(v):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1
    return None if ok else "a number in [0, 1)"


def _unit_interval(v):
    ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1)
    return None if ok else "a number in (0, 1) or null"


def _choice(*options):
    def check(v):
        return None if v is None or v in options else f"one of {list(options)} or null"
    return check


def _optional(rule):
    def check(v):
        problem = None if v is None else rule(v)
        return problem and problem + " or null"
    return check


def _check_dp(cfg: SiteConfig, site: str) -> None:
    """DP settings that only make sense together; privacy is never silently off. (And the
    multiple-choice evaluation's settings, which need its questions.)"""
    if cfg.eval_mc is None and (cfg.eval_mc_shots or cfg.eval_mc_limit is not None or cfg.eval_mc_style != "letter"):
        key = "eval_mc_shots" if cfg.eval_mc_shots else "eval_mc_limit" if cfg.eval_mc_limit is not None else "eval_mc_style"
        raise ConfigError(f"site {site!r}: key {key!r}: a multiple-choice setting without questions; expected eval_mc too")
    if cfg.dp_epsilon is not None and cfg.dp_noise_multiplier is not None:
        raise ConfigError(f"site {site!r}: key 'dp_noise_multiplier': expected either dp_epsilon (a target) or "
                          f"dp_noise_multiplier, got both ({cfg.dp_epsilon!r} and {cfg.dp_noise_multiplier!r})")
    if not cfg.dp:
        given = [f.name for f in fields(cfg) if f.name.startswith("dp_") and getattr(cfg, f.name) is not None]
        if given:
            raise ConfigError(f"site {site!r}: key {given[0]!r}: DP option given but DP is off; "
                              "expected dp_epsilon or dp_noise_multiplier as well")
    if cfg.dp and cfg.gradient_checkpointing:  # Opacus' per-record gradients miss recomputed activations
        raise ConfigError(f"site {site!r}: key 'gradient_checkpointing': expected false with DP-SGD "
                          "(Opacus cannot compute per-record gradients through recomputed activations), got true")
    if cfg.dp_epsilon is not None and cfg.dp_epsilon_max is not None and cfg.dp_epsilon > cfg.dp_epsilon_max:
        raise ConfigError(f"site {site!r}: key 'dp_epsilon': expected a target <= dp_epsilon_max "
                          f"({cfg.dp_epsilon_max!r}), got {cfg.dp_epsilon!r}")


def _names(v):
    ok = isinstance(v, (list, tuple)) and v and all(isinstance(n, str) and n for n in v)
    return None if ok else "a non-empty list of module names"


_RULES = {
    "rank": _int(1),
    "alpha": positive,
    "target_modules": _names,
    "dropout": _dropout,
    "lr": positive,
    "local_steps": _int(1),
    "batch_size": _int(1),
    "grad_accum": _int(1),
    "max_length": _int(2),
    "eval_batch_size": _int(1),
    "max_new_tokens": _int(1),
    "threads": _int(1, optional=True),
    "seed": _int(0),
    "max_eval": _int(1, optional=True),
    "eval_mc": lambda v: None if v is None or (isinstance(v, str) and v.strip()) else "a path or null",
    "eval_mc_shots": _int(0),
    "eval_mc_limit": _int(1, optional=True),
    "eval_mc_style": _choice("letter", "cloze"),
    "dtype": lambda v: None if v in DTYPES else f"one of {list(DTYPES)}",
    "gradient_checkpointing": lambda v: None if isinstance(v, bool) else "true or false",
    "dp_epsilon": _optional(positive),
    "dp_noise_multiplier": _optional(positive),
    "dp_delta": _unit_interval,
    "dp_max_grad_norm": _optional(positive),
    "dp_accountant": _choice("rdp", "prv"),
    "dp_epsilon_max": _optional(positive),
    "dp_clipping": _choice("hooks", "functorch", "ghost", "fast"),
    "dp_planned_steps": _int(1, optional=True),
}
