"""A site admin's own settings, in the site's startup kit: ``<site>/local/flare_lora.json``.

FLARE keeps what belongs to a site, not to a job, in the kit's ``local/`` folder (privacy.json,
resources.json); this file is flare-lora's part of it. It says where this site's models and
datasets live (a job names them by logical name), the limits no job may exceed, and the privacy
every job must have at this site. The site side reads it when a job starts there; a job that asks
for more than a limit, or lacks a required protection, is refused at that site with a message
naming the setting. Plain Python (no nvflare): the CLI checks POC sites' files with it up front.

Example (privacy/examples/flare_lora.json)::

    {"models": {"smollm2": "/srv/models/smollm2-135m"},
     "datasets": {"notes": "/srv/data/notes.jsonl"},
     "dp_epsilon_max": 8.0, "dp_delta": 1e-6, "dp_accountant": "rdp",
     "max_layers": 4, "max_threads": 8, "max_gpus": 2,
     "require_he": true, "require_client_dp": false, "require_dp_sgd": false,
     "allow_job_paths": false}

Environment variables of the FLARE client process (``FLARE_LORA_DP_EPSILON_MAX[_<SITE>]``,
``FLARE_LORA_MAX_LAYERS[_<SITE>]``) still apply where the file does not set the key.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from flare_lora.components.training.config import ConfigError, SiteConfig, check_keys, positive

FILE_NAME = "flare_lora.json"
ENV_FALLBACK = {"dp_epsilon_max": "FLARE_LORA_DP_EPSILON_MAX", "max_layers": "FLARE_LORA_MAX_LAYERS"}
KINDS = {"model": "models", "data": "datasets"}  # a job's --model / --data -> the file's map of names


def is_logical_name(value: str) -> bool:
    """A job's --model / --data that the site maps to its own path: a bare name (no path separator,
    not starting with "." or "~"). Anything else is a path (or, for models, a hub id "org/name")."""
    return bool(value) and os.sep not in value and "/" not in value and not value.startswith((".", "~"))


@dataclass(frozen=True)
class SiteLocal:
    """The parsed file (every limit None / requirement False when the file does not set it)."""

    site: str = ""
    root: str | None = None  # the site's FLARE workspace (its kit), where its ledgers live
    path: str = "(no local/flare_lora.json)"
    models: dict[str, str] = field(default_factory=dict)
    datasets: dict[str, str] = field(default_factory=dict)
    dp_epsilon_max: float | None = None
    dp_delta: float | None = None
    dp_accountant: str | None = None
    max_layers: int | None = None
    max_threads: int | None = None
    max_gpus: int | None = None
    require_he: bool = False
    require_client_dp: bool = False
    require_dp_sgd: bool = False
    allow_job_paths: bool = True  # false: a job names this site's model and data only by logical name

    @classmethod
    def load(cls, site_root: str | None, site: str, environ: Mapping[str, str] | None = None) -> SiteLocal:
        """From ``<site_root>/local/flare_lora.json`` (none: no settings), then the environment fallback."""
        path = os.path.join(site_root, "local", FILE_NAME) if site_root else None
        if path is None or not os.path.exists(path):
            return cls(site=site, root=site_root).with_environment(environ)
        with open(path, encoding="utf-8") as f:
            return replace(cls.parse(f.read(), site, path), root=site_root).with_environment(environ)

    @classmethod
    def parse(cls, text: str, site: str, path: str) -> SiteLocal:
        """Validated settings; ConfigError naming the site, the file (and line) and the key."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"site {site!r}: {path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"site {site!r}: {path}: expected a JSON object of settings, got {type(data).__name__}")
        check_keys(data, _RULES, f"site {site!r}: {path}")
        return cls(site=site, path=path, **data)

    def with_environment(self, environ: Mapping[str, str] | None = None) -> SiteLocal:
        """Keys the file leaves unset, from ``<VAR>_<SITE>`` or ``<VAR>`` (the fallback of older kits)."""
        environ = os.environ if environ is None else environ
        updates = {}
        for key, var in ENV_FALLBACK.items():
            if getattr(self, key) is not None:
                continue
            for name in (f"{var}_{re.sub(r'[^A-Za-z0-9]', '_', self.site).upper()}", var):
                text = (environ.get(name) or "").strip()
                if not text:
                    continue
                try:
                    value = float(text) if key == "dp_epsilon_max" else int(text)
                except ValueError:
                    value = None
                if value is None or _RULES[key](value):
                    raise ConfigError(f"site {self.site!r}: {name}={text!r}: expected {_RULES[key](-1)}")
                updates[key] = value
                break
        return replace(self, **updates)

    # --- what a job asks for, against the site's settings --------------------------------------

    def resolve(self, kind: str, value: str | None) -> str | None:
        """This site's path for a job's --model / --data (``kind``): a logical name through the file's
        map, anything else as the job gave it."""
        if value is None:
            return value
        if not is_logical_name(value):
            if not self.allow_job_paths:
                raise ConfigError(f"site {self.site!r}: allow_job_paths is false in {self.path}: the job must name its "
                                  f"{kind} by a logical name this site maps, got the path {value!r}; refusing the job here")
            return value
        names = getattr(self, KINDS[kind])
        if value not in names:
            raise ConfigError(f"site {self.site!r}: {kind} {value!r} is a logical name, but {self.path} maps "
                              f"{KINDS[kind]} {sorted(names)}; the site admin adds "
                              f'"{KINDS[kind]}": {{"{value}": "/path/at/this/site"}}')
        return names[value]

    def check_config(self, cfg: SiteConfig, *, processes: int = 1) -> SiteConfig:
        """The job's settings for this site under the site's limits: refused (naming the setting)
        where the job asks for more; unset threads take the site's cap."""
        def refuse(key: str, asked, setting: str, limit) -> None:
            raise ConfigError(f"site {self.site!r}: the job asks for {key}={asked!r}, more than this site allows "
                              f"({setting}={limit!r} in {self.path}); refusing the job here")

        if self.max_threads is not None and cfg.threads is not None and cfg.threads > self.max_threads:
            refuse("threads", cfg.threads, "max_threads", self.max_threads)
        if self.max_gpus is not None and processes > self.max_gpus:
            refuse("training processes (--ddp)", processes, "max_gpus", self.max_gpus)
        if self.require_dp_sgd and self.dp_epsilon_max is None:  # any noise level would do otherwise
            raise ConfigError(f"site {self.site!r}: require_dp_sgd is true in {self.path} but no dp_epsilon_max: "
                              "expected a budget that bounds what a job's noise level may spend")
        if self.require_dp_sgd and not cfg.dp:
            raise ConfigError(f"site {self.site!r}: require_dp_sgd is true in {self.path}: every job trains with "
                              "DP-SGD here; expected dp_epsilon or dp_noise_multiplier (--dp-epsilon), got neither")
        if self.dp_epsilon_max is not None and cfg.dp_epsilon is not None and cfg.dp_epsilon > self.dp_epsilon_max:
            refuse("dp_epsilon", cfg.dp_epsilon, "dp_epsilon_max", self.dp_epsilon_max)
        if cfg.threads is None and self.max_threads is not None:
            return replace(cfg, threads=self.max_threads)
        return cfg

    def check_privacy(self, *, he: bool, client_dp: bool) -> None:
        """Refuse a job without the protection this site requires of every job."""
        for required, present, what in ((self.require_he, he, "he"), (self.require_client_dp, client_dp, "client_dp")):
            if required and not present:
                raise ConfigError(f"site {self.site!r}: require_{what} is true in {self.path}: every job must "
                                  f"{_REQUIREMENT[what]} at this site; this job does not. Refusing it here")


_REQUIREMENT = {
    "he": "aggregate with homomorphic encryption (--he)",
    "client_dp": "get this site's client-level DP: a ClientDPFilter in the task_result_filters of the "
                 "local/privacy.json scope the job uses (its own --client-dp-* filter has the job's parameters, "
                 "so it does not count)",
}


def _count(v):
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else "an integer >= 1"


def _paths(v):
    ok = isinstance(v, dict) and all(isinstance(k, str) and is_logical_name(k) and isinstance(p, str)
                                     and os.path.isabs(p) for k, p in v.items())
    return None if ok else 'an object {"name": "/absolute/path"} (names without "/")'


_RULES = {
    "models": _paths,
    "datasets": _paths,
    "dp_epsilon_max": positive,
    "dp_delta": lambda v: None if isinstance(v, float) and 0 < v < 1 else "a number in (0, 1)",
    "dp_accountant": lambda v: None if v in ("rdp", "prv") else "'rdp' or 'prv'",
    "max_layers": _count,
    "max_threads": _count,
    "max_gpus": _count,
    "require_he": lambda v: None if isinstance(v, bool) else "true or false",
    "require_client_dp": lambda v: None if isinstance(v, bool) else "true or false",
    "require_dp_sgd": lambda v: None if isinstance(v, bool) else "true or false",
    "allow_job_paths": lambda v: None if isinstance(v, bool) else "true or false",
}
