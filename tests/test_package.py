"""The package's shape: one top-level import name, its layering rules, small runtime files."""

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]
RUNTIME = [p for folder in ("components", "privacy") for p in sorted((CHECKOUT / folder).rglob("*.py"))]


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (a lazy import counts too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def in_folder(*parts: str) -> list[Path]:
    return [p for p in RUNTIME if p.relative_to(CHECKOUT).parts[: len(parts)] == parts]


@pytest.mark.parametrize("path", in_folder("components", "algorithms") + in_folder("components", "strategies"),
                         ids=lambda p: str(p.relative_to(CHECKOUT)))
def test_algorithm_core_imports_neither_nvflare_nor_privacy_flare_side(path):
    bad = sorted(m for m in imports(path) if m.split(".")[0] == "nvflare" or m.startswith("flare_lora.privacy.flare"))
    assert not bad, f"{path.relative_to(CHECKOUT)} imports {bad}"


@pytest.mark.parametrize("path", in_folder("privacy"), ids=lambda p: str(p.relative_to(CHECKOUT)))
def test_privacy_never_imports_the_flare_glue_of_components(path):
    glue = ("flare_lora.components.flare", "flare_lora.components.cli")
    assert not [m for m in imports(path) if m.startswith(glue)], path.relative_to(CHECKOUT)


def test_no_runtime_file_over_400_lines():
    long = {str(p.relative_to(CHECKOUT)): n for p in RUNTIME if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_old_top_level_names_are_not_importable_outside_the_checkout(tmp_path):
    code = ("import importlib.util as u, flare_lora.components.algorithms.stacking; "
            "print(u.find_spec('components'), u.find_spec('privacy'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "None"]


@pytest.mark.e2e
def test_wheel_has_exactly_one_top_level_package_holding_every_module(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(CHECKOUT)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("flare_lora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info" not in n.split("/")[0]} == {"flare_lora"}
    top = CHECKOUT / "components" / "top_level"  # the package's own __init__ (flare_lora.load)
    expected = {"flare_lora/" + (str(p.relative_to(top)) if p.is_relative_to(top) else str(p.relative_to(CHECKOUT)))
                for p in RUNTIME}
    assert expected <= set(names), sorted(expected - set(names))[:5]
    assert "flare_lora/nvflare_jobs/provision/project.yml" in names
    assert "flare_lora/privacy/examples/privacy.json" in names
