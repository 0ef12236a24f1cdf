"""Per-site training hyperparameters, validated where they enter (a job's config dict).

A bad value fails at job start with the site and key named, instead of as a shape error or a NaN
loss in the middle of a federated round.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields


class ConfigError(ValueError):
    """An invalid configuration value; the message names the site and key."""


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
        known = [f.name for f in fields(cls)]
        for key, value in d.items():
            if key not in known:
                raise ConfigError(f"site {site!r}: key {key!r}: expected one of {known}, got an unknown key")
            problem = _RULES[key](value)
            if problem:
                raise ConfigError(f"site {site!r}: key {key!r}: expected {problem}, got {value!r}")
        return cls(**{k: list(v) if k == "target_modules" else v for k, v in d.items()})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(minimum: int, optional: bool = False):
    def check(v):
        if (v is None and optional) or (_is_int(v) and v >= minimum):
            return None
        return f"an integer >= {minimum}" + (" or null" if optional else "")
    return check


def _positive(v):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf
    return None if ok else "a finite number > 0"


def _dropout(v):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1
    return None if ok else "a number in [0, 1)"


def _names(v):
    ok = isinstance(v, (list, tuple)) and v and all(isinstance(n, str) and n for n in v)
    return None if ok else "a non-empty list of module names"


_RULES = {
    "rank": _int(1),
    "alpha": _positive,
    "target_modules": _names,
    "dropout": _dropout,
    "lr": _positive,
    "local_steps": _int(1),
    "batch_size": _int(1),
    "grad_accum": _int(1),
    "max_length": _int(2),
    "eval_batch_size": _int(1),
    "max_new_tokens": _int(1),
    "threads": _int(1, optional=True),
    "seed": _int(0),
    "max_eval": _int(1, optional=True),
}
