"""What a site starts for a job that carries no code: the plugin's own training entry point.

nvflare checks a job's component *classes* against the site's allow-list, not their arguments, so
the allow-listed executor's ``command`` would otherwise let a job without code run anything at a
site that denies bring-your-own-code. A job that ships code (its app's ``custom/`` folder) needed
the submitter's "byoc" right, which the site granted; its command is its own.

For a job without code the site also decides how it runs (``site_command``): with the interpreter
that runs the site's FLARE client (which holds the plugin the site installed), in safe-path mode
(``-P`` and PYTHONSAFEPATH for DDP workers: the job's folder is not on ``sys.path``), at most as many DDP processes as the site
allows; and the job's app may hold configuration only (``check_app_files``): no file Python could
import in place of the plugin.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import sys
from collections.abc import Sequence

from flare_lora.components.flare.site_args import client_parser

CLIENT_MODULE = "flare_lora.components.flare.client_train"
ENTRY = ["-m", CLIENT_MODULE]
PYTHON = re.compile(r"python(3(\.\d+)?)?")  # the interpreter's file name; where it lives is the site's business
INTERPRETER_OPTIONS = re.compile(r"(-u|-m torch\.distributed\.run --standalone --nproc_per_node=[1-9][0-9]*)?")


NPROC = re.compile(r"--nproc_per_node=([0-9]+)")
IMPORTABLE = (".py", ".pyc", ".pyd", ".so", ".pth", ".egg", ".whl", ".zip")
FLARE_FILES = ".__nvfl_"  # FLARE's own files in a deployed app: signatures, the submitter's certificate


def check_app_files(app_dir: str) -> None:
    """ValueError naming the first file of a code-free job's app that is not configuration: outside
    config/ (and the empty custom/), or anything Python imports."""
    for folder, _, files in os.walk(app_dir):
        for name in files:
            path = os.path.relpath(os.path.join(folder, name), app_dir)
            top = path.split(os.sep, 1)[0]
            if name.startswith(FLARE_FILES) and not name.lower().endswith(IMPORTABLE):
                continue
            if top != "config" or name.lower().endswith(IMPORTABLE):
                raise ValueError(f"the job's app holds {path!r}: a job without code may carry files under config/ "
                                 f"only, none that Python imports ({', '.join(IMPORTABLE)})")


def site_command(argv: Sequence[str], max_processes: int) -> list[str]:
    """A checked plugin command as this site runs it: its own interpreter, ``-P`` (Python >= 3.11),
    and a DDP process count of at most ``max_processes`` (ValueError naming both otherwise)."""
    nproc = next((int(m.group(1)) for a in argv if (m := NPROC.fullmatch(a))), 1)
    if nproc > max_processes:
        raise ValueError(f"the job asks for {nproc} training processes (--nproc_per_node), this site allows "
                         f"{max_processes} (local/flare_lora.json max_gpus, else its GPU count)")
    if sys.version_info < (3, 11):
        return [sys.executable, *argv[1:]]
    # -P for this process, PYTHONSAFEPATH for the DDP workers torchrun starts with a plain interpreter
    return [shutil.which("env") or "/usr/bin/env", "PYTHONSAFEPATH=1", sys.executable, "-P", *argv[1:]]


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
