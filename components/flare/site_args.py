"""Per-site config <-> script arguments.

FLARE splits in-process script arguments on whitespace without shell unquoting, and external
commands with shell rules, so the only encoding that survives both is quote-free ``key=value``
tokens (lists joined by commas). Values are parsed back as JSON scalars where they look like one.
"""

from __future__ import annotations

import argparse
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


def client_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The shared client script's arguments (components/flare/client_train.py); the executor checks
    a job's arguments with it before starting anything."""
    p = argparse.ArgumentParser(prog="flare_lora.components.flare.client_train", description=description)
    p.add_argument("--method", default="flora")
    p.add_argument("--model", default=None, help="model dir (safetensors or GGUF), or a name this site maps in "
                                                 "local/flare_lora.json; default: embedded")
    p.add_argument("--data", default=None, help="dir with <site>.jsonl files or one site's .jsonl file, or a name "
                                                "this site maps in local/flare_lora.json; default: embedded tasks")
    p.add_argument("--site-index", type=int, default=0, help="picks the embedded task mix")
    p.add_argument("--site-config", nargs="*", default=[], help="key=value tokens: rank=8 alpha=16 ...")
    g = p.add_argument_group("selective layers (--method selective)")
    g.add_argument("--mode", choices=["full", "lora"], default="lora", help="train full layer weights or their LoRA factors")
    g.add_argument("--budget", type=int, default=None, help="layers this site may train per round (default: all)")
    g.add_argument("--score-batches", type=int, default=2, help="local batches the layer scores are measured on")
    g.add_argument("--init-seed", type=int, default=0, help="LoRA init shared by every site (lora mode)")
    return p
