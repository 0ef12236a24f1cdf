"""The production project.yml (nvflare_jobs/provision/project.yml) for your server and N sites.

    flare-lora provision --sites hospital-a,hospital-b,hospital-c,hospital-d \\
        --server fl.coordinator.example.org --domain example.org -o project.yml [--he]
    nvflare provision -p project.yml -w workspace

Keeps the template's builders and project admin; writes one client per site (its own org)
and, per site, an ``org_admin`` (``it@<site>.<domain>``, operates the site) and a ``lead``
(``researcher@<site>.<domain>``, submits jobs). ``--he`` turns on the HEBuilder entry.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from importlib import resources

import yaml

from flare_lora.privacy.he_context import RECOMMENDED

HE_BUILDER = {"path": "nvflare.lighter.impl.he.HEBuilder", "args": {**RECOMMENDED, "scheme": "CKKS"}}  # docs/he.md
_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]*$")


def org_name(site: str) -> str:
    """A site's organisation: nvflare allows only letters, digits and '_' there."""
    return re.sub(r"[^A-Za-z0-9_]", "_", site)


def load_template(path: str | None = None) -> dict:
    """A project.yml to start from; by default the one the package ships (nvflare_jobs/provision/
    in the checkout), so an installed plugin needs no checkout."""
    if path is None:
        return yaml.safe_load((resources.files("flare_lora.nvflare_jobs") / "provision" / "project.yml").read_text())
    if not os.path.isfile(path):
        raise ValueError(f"project template not found: {path} (pass --template <project.yml>)")
    with open(path) as f:
        return yaml.safe_load(f)


def render_project(sites: Sequence[str], *, server: str | None = None, domain: str = "example.org",
                   fed_learn_port: int | None = None, admin_port: int | None = None,
                   project_admin: str | None = None, he: bool = False, template: dict | None = None) -> dict:
    """project.yml content for ``sites``; unset arguments keep the template's values."""
    config = template if template is not None else load_template()
    if not sites or len(set(sites)) != len(sites):
        raise ValueError(f"sites: expected unique site names, got {list(sites)}")
    for name in [*sites, *([server] if server else [])]:
        if not _NAME.match(name):
            raise ValueError(f"site/server name {name!r}: expected lower-case letters, digits, '.' and '-'")
    parts = config["participants"]
    srv = dict(next(p for p in parts if p["type"] == "server"))
    admin = dict(next(p for p in parts if p.get("role") == "project_admin"))
    if server:
        srv["name"] = server
    if fed_learn_port:
        srv["fed_learn_port"] = int(fed_learn_port)
    if admin_port:
        srv["admin_port"] = int(admin_port)
    if project_admin:
        admin["name"] = project_admin
    clients = [{"name": s, "type": "client", "org": org_name(s)} for s in sites]
    admins = [admin]
    for s in sites:
        admins.append({"name": f"it@{s}.{domain}", "type": "admin", "org": org_name(s), "role": "org_admin"})
        admins.append({"name": f"researcher@{s}.{domain}", "type": "admin", "org": org_name(s), "role": "lead"})
    builders = [b for b in config["builders"] if b["path"] != HE_BUILDER["path"]]
    if he:  # before the signature builder, so the TenSEAL contexts are signed with the kit
        at = next(i for i, b in enumerate(builders) if b["path"].endswith(".SignatureBuilder"))
        builders.insert(at, HE_BUILDER)
    return {**config, "participants": [srv, *clients, *admins], "builders": builders}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="flare-lora provision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", required=True, help="comma-separated site names, e.g. hospital-a,hospital-b")
    p.add_argument("--server", default=None, help="the server's FQDN (default: the template's)")
    p.add_argument("--domain", default="example.org", help="e-mail domain of the generated site admins")
    p.add_argument("--fed-learn-port", type=int, default=None)
    p.add_argument("--admin-port", type=int, default=None)
    p.add_argument("--project-admin", default=None, help="login of the project admin (default: the template's)")
    p.add_argument("--he", action="store_true", help="provision TenSEAL contexts (HE)")
    p.add_argument("--template", default=None, help="the project.yml to start from (default: the one flare-lora ships)")
    p.add_argument("-o", "--output", default="project.yml")
    args = p.parse_args(argv)
    try:
        config = render_project(
            [s for s in args.sites.split(",") if s], server=args.server, domain=args.domain,
            fed_learn_port=args.fed_learn_port, admin_port=args.admin_port, project_admin=args.project_admin,
            he=args.he, template=load_template(args.template),
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(args.output, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    print(f"{args.output}: server {config['participants'][0]['name']}, {len(args.sites.split(','))} site(s); "
          f"next: nvflare provision -p {args.output} -w <workspace>")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
