"""The isolated POC (components/flare/poc.py) and its test harness (tests/poc_harness.py), with a trivial NumPy job."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import flare_lora.components
from flare_lora.components.flare.poc import NVFLARE_DEFAULT_POC_WORKSPACE, IsolatedPocEnv
from flare_lora.components.flare.poc_processes import terminate
from flare_lora.components.flare.poc_project import build_project_config, find_free_ports, poc_prod_dir
from poc_harness import isolated_poc, poc_log_paths, workspace_processes

REPO_ROOT = Path(__file__).resolve().parents[1]

CLIENT_SCRIPT = textwrap.dedent(
    """
    import argparse, json, os, sys

    import nvflare.client as flare

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    def listening_ports():
        ports = set()
        for name in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(name) as f:
                    next(f)
                    for line in f:
                        cols = line.split()
                        if cols[3] == "0A":  # TCP_LISTEN
                            ports.add(int(cols[1].rsplit(":", 1)[1], 16))
            except OSError:
                pass
        return sorted(ports)

    flare.init()
    site = flare.get_site_name()
    import flare_lora.components as components  # the project package must be importable inside POC job processes

    info = {
        "site": site,
        "home": os.environ.get("HOME"),
        "pythonpath": os.environ.get("PYTHONPATH"),
        "cwd": os.getcwd(),
        "sys_path": sys.path,
        "executable": sys.executable,
        "components_file": components.__file__,
        "listening_ports": listening_ports(),
    }
    with open(os.path.join(args.out, f"{site}.json"), "w") as f:
        json.dump(info, f)

    while flare.is_running():
        model = flare.receive()
        params = {k: v + 1 for k, v in model.params.items()}
        flare.send(flare.FLModel(params=params, metrics={"accuracy": 1.0}, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
    """
)


def _snapshot(path: str) -> dict:
    """Existence + (path, mtime_ns, size) of everything under ``path``."""
    p = Path(path)
    if not p.exists():
        return {"exists": False}
    entries = {}
    for q in [p, *p.rglob("*")]:
        try:
            st = q.lstat()
        except OSError:
            continue
        entries[str(q)] = (st.st_mtime_ns, st.st_size)
    return {"exists": True, "entries": entries}


def _ps_lines_mentioning(text: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if text in line and "ps -eo" not in line]


def test_project_config_uses_given_ports_and_clients():
    f, a = find_free_ports(2)
    assert f != a
    cfg = build_project_config(["alpha", "beta"], fed_learn_port=f, admin_port=a)
    server = [p for p in cfg["participants"] if p["type"] == "server"]
    assert server == [{"name": "server", "type": "server", "org": "nvidia", "fed_learn_port": f,
                       "admin_port": a, "default_host": "localhost"}]
    assert [p["name"] for p in cfg["participants"] if p["type"] == "client"] == ["alpha", "beta"]
    assert cfg["builders"], "builders come from nvflare's own POC template"


def test_refuses_shared_default_workspace():
    with pytest.raises(ValueError, match="refusing"):
        IsolatedPocEnv(["site-1"], NVFLARE_DEFAULT_POC_WORKSPACE)


def test_refuses_to_wipe_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    env = IsolatedPocEnv(["site-1"], tmp_path, home=tmp_path.parent / f"{tmp_path.name}_home")
    with pytest.raises(ValueError, match="refusing to wipe"):
        env.provision()
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.e2e
def test_trivial_numpy_job_in_isolated_poc(tmp_path):
    """The runtime IsolatedPocEnv (what ``--env poc`` runs), not the harness: its own ports, HOME and
    local files, logs kept, and its stop() (pid files only) leaves no process of the workspace."""
    from nvflare.app_common.np.recipes.fedavg import NumpyFedAvgRecipe

    t_start = time.monotonic()
    real_nvflare_dir = os.path.join(os.path.expanduser("~"), ".nvflare")
    before = {d: _snapshot(d) for d in (real_nvflare_dir, NVFLARE_DEFAULT_POC_WORKSPACE)}

    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    info_dir = tmp_path / "client_info"
    info_dir.mkdir()
    workspace = tmp_path / "poc"
    home = tmp_path / "home"
    clients = ["site-1", "site-2"]
    initial = [[1.0, 2.0], [3.0, 4.0]]

    recipe = NumpyFedAvgRecipe(
        name="harness_trivial",
        model=initial,
        min_clients=2,
        num_rounds=2,
        train_script=str(script),
        train_args=f"--out {info_dir}",
    )
    marker = {"written_by": "test_poc_harness"}
    env = IsolatedPocEnv(clients, str(workspace), home=str(home), local_files={"site-1": {"harness_marker.json": marker}})
    try:
        run = recipe.run(env)
        result_dir = run.get_result(timeout=60, clean_up=False)
        status = run.get_status()
    finally:
        env.stop()
    leftovers = workspace_processes(workspace)
    terminate(lambda: {pid: False for pid in workspace_processes(workspace)})  # what stop() missed, if anything
    print("total:", time.monotonic() - t_start)

    # -- job succeeded, result downloaded and kept
    assert status == "FINISHED:COMPLETED"
    assert result_dir and os.path.isdir(result_dir)
    assert Path(result_dir).resolve().is_relative_to(workspace.resolve())
    assert os.path.isfile(os.path.join(result_dir, "workspace", "log.txt")), "server job log in result dir"
    model = np.load(os.path.join(result_dir, "workspace", "models", "server.npy"))
    np.testing.assert_allclose(model, np.array(initial) + 2)  # +1 per round, 2 rounds

    # -- logs of server and each site are findable after the POC stopped
    job_id = os.path.basename(result_dir)
    logs = poc_log_paths(workspace, job_id)
    assert set(logs) == {"server", *clients}
    assert {"console", "log"} <= set(logs["server"])
    for site in clients:
        assert {"console", "log", "job_log"} <= set(logs[site]), logs[site]
        assert os.path.getsize(logs[site]["job_log"]) > 0

    # -- our own ports were configured and listened on, not the defaults
    f_port, a_port = env.fed_learn_port, env.admin_port
    assert {f_port, a_port}.isdisjoint({8002, 8003})
    prod = poc_prod_dir(workspace)
    server_cfg = json.loads(Path(prod, "server", "startup", "fed_server.json").read_text())
    assert server_cfg["servers"][0]["admin_port"] == a_port
    assert server_cfg["servers"][0]["service"]["target"].endswith(f":{f_port}")
    client_cfg = json.loads(Path(prod, "site-1", "startup", "fed_client.json").read_text())
    assert client_cfg["servers"][0]["service"]["target"] == f"localhost:{f_port}"
    admin_cfg = json.loads(Path(prod, "admin@nvidia.com", "startup", "fed_admin.json").read_text())
    assert admin_cfg["admin"]["port"] == a_port

    # -- what the POC job processes saw
    infos = {p.stem: json.loads(p.read_text()) for p in info_dir.glob("*.json")}
    assert set(infos) == set(clients)
    for info in infos.values():
        assert {f_port, a_port} <= set(info["listening_ports"])
        assert info["home"] == str(home)
        assert Path(info["components_file"]).resolve() == Path(flare_lora.components.__file__).resolve()  # the installed package

    # -- site local/ hook
    assert json.loads(Path(prod, "site-1", "local", "harness_marker.json").read_text()) == marker

    # -- isolation: default ~/.nvflare and default POC workspace untouched
    after = {d: _snapshot(d) for d in before}
    assert after == before

    # -- nothing left running
    assert leftovers == {}
    assert _ps_lines_mentioning(str(workspace)) == []
    assert not env.is_running()
    assert time.monotonic() - t_start < 90


@pytest.mark.e2e
def test_pids_kill_site_and_cleanup(tmp_path):
    """pids() finds each participant's processes; kill_site keeps a site down; stop leaves nothing."""
    workspace = tmp_path / "poc"
    with isolated_poc(["site-1", "site-2"], workspace, home=tmp_path / "home") as env:
        pids = env.pids()
        assert set(pids) == {"server", "site-1", "site-2"}
        for name, p in pids.items():
            assert p.daemon and p.main, (name, p)
            cmd = Path(f"/proc/{p.main}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            assert str(workspace) in cmd and name in cmd
        assert env.is_running()

        killed = env.kill_site("site-2")
        assert pids["site-2"].daemon in killed and pids["site-2"].main in killed
        time.sleep(7)  # the watchdog would have restarted the client after ~5 s
        after = env.pids()
        assert after["site-2"].all == []
        assert after["site-1"].main == pids["site-1"].main  # other participants unaffected
        assert after["server"].main == pids["server"].main
    assert workspace_processes(workspace) == {}
    assert _ps_lines_mentioning(str(workspace)) == []
    for name in ("server", "site-1", "site-2"):
        assert not list(Path(poc_prod_dir(workspace), name).glob("*.fl")), "stale pid/shutdown files"
