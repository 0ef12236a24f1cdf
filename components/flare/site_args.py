"""Per-site config <-> script arguments.

FLARE splits in-process script arguments on whitespace without shell unquoting, and external
commands with shell rules, so the only encoding that survives both is quote-free ``key=value``
tokens (lists joined by commas). Values are parsed back as JSON scalars where they look like one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence


def to_args(config: Mapping) -> list[str]:
    """``{"rank": 4, "target_modules": ["q_proj", "v_proj"]}`` -> ``["rank=4", "target_modules=q_proj,v_proj"]``."""
    tokens = []
    for key, value in config.items():
        text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else json.dumps(value)
        text = text.strip('"') if isinstance(value, str) else text
        if not text or any(c.isspace() for c in text) or "=" in key:
            raise ValueError(f"site config key {key!r}: value {value!r} cannot be passed as a script argument")
        tokens.append(f"{key}={text}")
    return tokens


def from_args(tokens: Sequence[str], list_keys: Sequence[str] = ("target_modules",)) -> dict:
    """Inverse of to_args; a token without '=' raises ValueError naming it."""
    config = {}
    for token in tokens:
        key, sep, text = token.partition("=")
        if not sep:
            raise ValueError(f"site config token {token!r}: expected key=value")
        if key in list_keys:
            config[key] = [t for t in text.split(",") if t]
            continue
        try:
            config[key] = json.loads(text)
        except json.JSONDecodeError:
            config[key] = text
    return config
