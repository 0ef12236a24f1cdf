"""The console a user watches: by default one line per site per round (the ``flare_lora.progress``
logger) and warnings; FLARE's own INFO logs still go to the run's log files (log.txt, ...).

``--log-level`` picks: ``concise`` (that default), FLARE's modes (``full``, ``verbose``,
``msg_only``) or a level name (``INFO``, ``DEBUG``, ...) passed to FLARE unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile

PROGRESS = "flare_lora.progress"
LOG_LEVELS = ("concise", "full", "verbose", "msg_only", "DEBUG", "INFO", "WARNING", "ERROR")


class ConsoleFilter(logging.Filter):
    """Progress lines, and anything at WARNING or above."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name == PROGRESS


def concise_config() -> dict:
    """FLARE's default logging config with the console handler filtered by ConsoleFilter and
    printing the message only."""
    from flare_lora.components.flare.nvflare_compat import default_log_config

    config = copy.deepcopy(default_log_config())
    config.setdefault("filters", {})["flare_lora_console"] = {"()": f"{__name__}.ConsoleFilter"}
    config.setdefault("formatters", {})["flare_lora_console"] = {"format": "%(message)s"}
    console = config["handlers"]["consoleHandler"]
    console.update(filters=["flare_lora_console"], formatter="flare_lora_console")
    return config


def log_config(level: str) -> str:
    """What SimEnv's ``log_config`` takes for ``level``: for ``concise`` a config file (one per
    content, under /tmp/flare_lora beside the run workspaces, so nothing is written into a workspace
    before the job's checks pass), else FLARE's own mode or level name."""
    if level != "concise":
        return level
    text = json.dumps(concise_config(), indent=1, sort_keys=True)
    folder = os.path.join(tempfile.gettempdir(), "flare_lora")
    path = os.path.join(folder, f"log_config-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json")
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as f:
            f.write(text)
        os.replace(f.name, path)  # atomic: runs started together never read half a file
    return path
