"""What a site starts for a job that carries no code: the plugin's own training entry point.

nvflare checks a job's component *classes* against the site's allow-list, not their arguments, so
the allow-listed executor's ``command`` would otherwise let a job without code run anything at a
site that denies bring-your-own-code. A job that ships code (its app's ``custom/`` folder) needed
the submitter's "byoc" right, which the site granted; its command is its own.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from collections.abc import Sequence

from flare_lora.components.flare.site_args import client_parser

CLIENT_MODULE = "flare_lora.components.flare.client_train"
ENTRY = ["-m", CLIENT_MODULE]
PYTHON = re.compile(r"python(3(\.\d+)?)?")  # the interpreter's file name; where it lives is the site's business
INTERPRETER_OPTIONS = re.compile(r"(-u|-m torch\.distributed\.run --standalone --nproc_per_node=[1-9][0-9]*)?")


def job_has_code(custom_dir: str) -> bool:
    """A job's app ships code: any file in its custom/ folder."""
    return any(files for _, _, files in os.walk(custom_dir))


def check_plugin_command(command: str | Sequence[str]) -> list[str]:
    """``command`` as argv if it starts the plugin's client module with arguments it accepts;
    ValueError naming what the job set otherwise."""
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if not argv or not PYTHON.fullmatch(os.path.basename(argv[0])):
        raise ValueError(f"the job's command must start a Python interpreter, got {argv[:1]}")
    try:
        at = next(i for i in range(1, len(argv)) if argv[i:i + 2] == ENTRY)
    except StopIteration:
        raise ValueError(f"the job's command must run '-m {CLIENT_MODULE}', got {argv}") from None
    if not INTERPRETER_OPTIONS.fullmatch(" ".join(argv[1:at])):
        raise ValueError(f"the job's interpreter options {argv[1:at]}: expected none, '-u' or "
                         "'-m torch.distributed.run --standalone --nproc_per_node=N'")
    args = argv[at + 2:]
    secret = next((a for a in argv if "${secret:" in a), None)
    if secret is not None:  # nvflare would resolve it after this check, into the site's secrets
        raise ValueError(f"the job's command may not reference the site's secrets, got {secret!r}")
    if "-h" in args or "--help" in args:
        raise ValueError(f"the job's arguments to {CLIENT_MODULE}: -h/--help is not a training run")
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            _, unknown = client_parser().parse_known_args(args)
    except SystemExit:
        lines = errors.getvalue().strip().splitlines() or ["refused by its parser"]
        raise ValueError(f"the job's arguments to {CLIENT_MODULE}: {lines[-1]}") from None
    if unknown:
        raise ValueError(f"the job's arguments to {CLIENT_MODULE}: unknown {unknown}")
    return argv
