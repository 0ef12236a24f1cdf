"""What a FLARE site must allow to run flare-lora jobs that carry no code, and a tool that does it.

A job exported with ``--no-byoc`` names only classes that the site's own ``pip install flare-lora``
provides. FLARE then checks every class a config names against the site's ``class_allow_list``
(``local/resources.json``, nvflare/app_common/widgets/component_path_authorizer.py) instead of
requiring the submitter's "byoc" right. These are the entries beyond nvflare's default list;
tests/test_production.py checks with nvflare's own authorizer that a non-BYOC export of our jobs
passes with exactly them.

    flare-lora site-policy <startup kit dir> [--noise-mask] [--client-dp] [--he] [--deny-byoc]

adds the entries to the kit's ``local/resources.json`` (created from ``resources.json.default``,
which a ``resources.json`` replaces entirely) and, with ``--deny-byoc``, writes a
``local/authorization.json`` that grants no role the "byoc" right, so the site runs only code it
installed itself. Both files are read when a job starts: no restart needed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

SERVER_ALLOW = (  # the workflows of the LoRA, one-shot and selective-layer jobs
    "flare_lora.components.flare.controller.LoraController",
    "flare_lora.components.flare.one_shot_controller.OneShotController",
    "flare_lora.components.flare.selective_controller.SelectiveController",
)
CLIENT_ALLOW = ("flare_lora.components.flare.restarting_executor.RestartingExecutor",)
# client side, one per job option that adds a site filter
NOISE_MASK_ALLOW = ("flare_lora.components.flare.noise_mask.NoiseMaskFilter",)  # --mask-rho
CLIENT_DP_ALLOW = ("flare_lora.privacy.flare.client_dp_filter.ClientDPFilter",)  # client-level DP filter
HE_ALLOW = ("flare_lora.privacy.flare.he_filters.HEEncryptFilter", "flare_lora.privacy.flare.he_filters.HEDecryptFilter")  # --he


def allow_list_entries(role: str, *, noise_mask: bool = False, client_dp: bool = False, he: bool = False) -> list[str]:
    """The ``class_allow_list`` entries a ``role`` ("server" or "client") adds for our jobs."""
    if role == "server":
        return list(SERVER_ALLOW)
    if role == "client":
        options = ((noise_mask, NOISE_MASK_ALLOW), (client_dp, CLIENT_DP_ALLOW), (he, HE_ALLOW))
        return list(CLIENT_ALLOW) + [e for on, entries in options if on for e in entries]
    raise ValueError(f"role: expected 'server' or 'client', got {role!r}")


def kit_role(kit_dir: str) -> str:
    """"server" or "client", from the startup kit's fed_*.json."""
    for role in ("server", "client"):
        if os.path.isfile(os.path.join(kit_dir, "startup", f"fed_{role}.json")):
            return role
    raise ValueError(f"{kit_dir}: not a server or client startup kit (no startup/fed_server.json or fed_client.json)")


def _local_json(kit_dir: str, name: str) -> dict:
    local = os.path.join(kit_dir, "local")
    for path in (os.path.join(local, name), os.path.join(local, name + ".default")):
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    raise ValueError(f"{kit_dir}: neither local/{name} nor local/{name}.default exists")


def _write_local_json(kit_dir: str, name: str, content: dict) -> str:
    path = os.path.join(kit_dir, "local", name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(content, f, indent=2)
    os.replace(tmp, path)
    return path


def allow_flare_lora(kit_dir: str, **options: bool) -> list[str]:
    """Append our entries (``options`` of :func:`allow_list_entries`) to the kit's class_allow_list;
    returns the entries added (none if already present)."""
    resources = _local_json(kit_dir, "resources.json")
    allow = resources.setdefault("class_allow_list", [])
    added = [e for e in allow_list_entries(kit_role(kit_dir), **options) if e not in allow]
    allow.extend(added)
    _write_local_json(kit_dir, "resources.json", resources)
    return added


def deny_byoc(kit_dir: str) -> str:
    """Write local/authorization.json: the provisioned policy with "byoc" denied to every role.

    ``project_admin`` is ``"any"`` in the provisioned policy; it becomes an explicit grant of every
    right the policy knows, except byoc.
    """
    policy = _local_json(kit_dir, "authorization.json")
    permissions = policy["permissions"]
    rights = sorted({r for p in permissions.values() if isinstance(p, dict) for r in p} | {"byoc"})
    for role, granted in permissions.items():
        if granted == "any":
            permissions[role] = {right: "any" for right in rights}
        permissions[role]["byoc"] = "none"
    return _write_local_json(kit_dir, "authorization.json", policy)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="flare-lora site-policy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kit_dir", help="a server or client startup kit (the directory holding startup/ and local/)")
    p.add_argument("--noise-mask", action="store_true", help="also allow the site-side noise-mask filter")
    p.add_argument("--client-dp", action="store_true", help="also allow the client-level DP filter")
    p.add_argument("--he", action="store_true", help="also allow the HE encrypt/decrypt filters")
    p.add_argument("--deny-byoc", action="store_true", help="also deny every role the 'byoc' right")
    args = p.parse_args(argv)
    try:
        added = allow_flare_lora(args.kit_dir, noise_mask=args.noise_mask, client_dp=args.client_dp, he=args.he)
        print(f"{args.kit_dir}: class_allow_list + {added or 'nothing (already present)'}")
        if args.deny_byoc:
            print(f"{deny_byoc(args.kit_dir)}: byoc denied to every role")
    except (ValueError, OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
