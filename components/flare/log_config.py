"""The console a user watches: by default one line per site per round (the ``flare_lora.progress``
logger) and warnings; FLARE's own INFO logs still go to the run's log files (log.txt, ...).

``--log-level`` picks: ``concise`` (that default), FLARE's modes (``full``, ``verbose``,
``msg_only``) or a level name (``INFO``, ``DEBUG``, ...) passed to FLARE unchanged.
"""

from __future__ import annotations

import copy
import json
import logging
import os

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


def log_config(level: str, workspace: str) -> str:
    """What SimEnv's ``log_config`` takes for ``level``: a config file written into ``workspace`` for
    ``concise``, else FLARE's own mode or level name."""
    if level != "concise":
        return level
    path = os.path.join(workspace, "flare_lora_log_config.json")
    os.makedirs(workspace, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(concise_config(), f, indent=1)
    return path
