"""What a site's local training started from, kept on the site's disk for its client-level DP filter.

The client script runs in its own process; the DP filter runs in the site's FLARE client and sees
only the result. So each train round the script writes the tensors it started from next to itself
and puts their path and digest in the result's meta; the filter loads them, checks the digest and
privatises the change (privacy/client_dp.py). The script writes the file every round because a
site's ``local/privacy.json`` can add the filter without the job knowing. Nothing of it leaves the
site but the meta entry, which the filter removes.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

META_KEY = "update_reference"


def digest(state: dict[str, Tensor]) -> str:
    """sha256 over sorted keys, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_reference(state: dict[str, Tensor], directory: str | None, name: str) -> dict:
    """Write ``state`` under ``directory`` (a temp dir when None); the meta entry that finds it."""
    directory = directory or os.path.join(tempfile.gettempdir(), "flare_lora_reference")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(os.path.abspath(directory), re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".safetensors")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, path)
    return {META_KEY: {"path": path, "digest": digest(tensors)}}


def load_reference(meta: dict | None) -> dict[str, Tensor]:
    """The reference a result's meta points to; ValueError when absent, unreadable or altered."""
    entry = (meta or {}).get(META_KEY)
    if not isinstance(entry, dict) or not entry.get("path") or not entry.get("digest"):
        raise ValueError(f"result meta has no {META_KEY!r} (path + digest of the state local training started "
                         "from): cannot tell the site's change from its starting point")
    try:
        state = load_file(entry["path"])
    except (OSError, ValueError) as e:
        raise ValueError(f"update reference {entry['path']}: unreadable ({e})") from e
    if digest(state) != entry["digest"]:
        raise ValueError(f"update reference {entry['path']}: digest mismatch (file changed since the round)")
    return state


def keep_reference(state: dict[str, Tensor], site: str, job_id: str | None = None) -> dict:
    """save_reference into the job's run dir of the site's FLARE workspace (a temp dir outside FLARE).

    One file per site, rewritten each round: the filter reads it before the server can send the
    next task, and the digest would catch any mix-up.
    """
    from flare_lora.privacy.ledger import site_root

    root = site_root(job_id=job_id)
    directory = os.path.join(root, job_id or "job", "flare_lora_reference") if root else None
    return save_reference(state, directory, site)
