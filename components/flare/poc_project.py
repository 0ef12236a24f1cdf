"""The project an isolated POC (components/flare/poc.py) is provisioned from, and where it lands.

nvflare's own POC template (same builders) with our participants, or a given project (e.g.
components/flare/provision.py's production one) whose server gets the POC's free ports on localhost.
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
from pathlib import Path
from typing import Mapping, Sequence, Union

import yaml

DEFAULT_ADMIN = "admin@nvidia.com"
PROJECT_NAME = "flare_lora_poc"
SERVER_NAME = "server"
ORG = "nvidia"


def build_project_config(clients: Sequence[str], *, fed_learn_port: int, admin_port: int,
                         admin: str = DEFAULT_ADMIN) -> dict:
    """nvflare's POC template (dummy_project.yml) with a server on these ports, ``clients`` and ``admin``."""
    import nvflare.lighter as lighter

    with open(os.path.join(os.path.dirname(lighter.__file__), "dummy_project.yml")) as f:
        config = yaml.safe_load(f)
    config["name"] = PROJECT_NAME
    config["participants"] = [
        {"name": SERVER_NAME, "type": "server", "org": ORG, "fed_learn_port": int(fed_learn_port),
         "admin_port": int(admin_port), "default_host": "localhost"},
        *({"name": c, "type": "client", "org": ORG} for c in clients),
        {"name": admin, "type": "admin", "org": ORG, "role": "project_admin"},
    ]
    return config


def with_server_ports(project: Mapping, *, fed_learn_port: int, admin_port: int) -> dict:
    """A copy of a project.yml config whose server listens on these ports, on localhost."""
    config = copy.deepcopy(dict(project))
    for p in config.get("participants", []):
        if p.get("type") == "server":
            p.update(fed_learn_port=int(fed_learn_port), admin_port=int(admin_port), default_host="localhost")
    return config


def check_project(project: Mapping, clients: Sequence[str], username: str) -> dict:
    """``project`` if its server is "server", its clients ``clients`` and ``username`` one of its admins."""
    parts = project.get("participants", [])
    servers = [p["name"] for p in parts if p.get("type") == "server"]
    got = [p["name"] for p in parts if p.get("type") == "client"]
    admins = [p["name"] for p in parts if p.get("type") == "admin"]
    if servers != [SERVER_NAME] or sorted(got) != sorted(clients) or username not in admins:
        raise ValueError(
            f"project {project.get('name')!r}: expected server [{SERVER_NAME!r}], clients {sorted(clients)} and admin "
            f"{username!r}; got server {servers}, clients {sorted(got)}, admins {admins}"
        )
    return dict(project)


def find_free_ports(n: int = 2, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports free right now (bound together, then released)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def poc_prod_dir(workspace: Union[str, Path]) -> str:
    """``<workspace>/<project>/prod_NN`` (the latest), as nvflare resolves it."""
    from nvflare.tool.poc.poc_commands import get_prod_dir

    workspace = os.path.abspath(str(workspace))
    with open(os.path.join(workspace, "project.yml")) as f:
        return get_prod_dir(workspace, yaml.safe_load(f).get("name"))
