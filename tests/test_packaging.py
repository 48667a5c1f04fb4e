"""Packaging contract: light imports, the `pec` entry point, ComfyUI metadata."""

import json
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("diffusers", "peft", "transformers", "trainer", "open_clip", "accelerate", "comfy")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}; import sys, json; print(json.dumps(sorted(sys.modules)))"],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_library_import_pulls_no_heavy_packages():
    mods = _modules_after(
        "import comfy_pec, comfy_pec.sde, comfy_pec.diversity, comfy_pec.lora_format, comfy_pec.nodes"
    )
    leaked = sorted(m for m in mods if m.split(".")[0] in HEAVY)
    assert not leaked, f"importing comfy_pec pulled in {leaked[:10]}"


def test_bare_package_import_does_not_even_import_torch():
    assert "torch" not in _modules_after("import comfy_pec")


def test_pec_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "trainer.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "inspect" in out.stdout and "usage: pec" in out.stdout


def test_pyproject_declares_package_entry_point_and_comfy_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "comfy-pec"
    assert meta["project"]["scripts"]["pec"] == "trainer.cli:main"
    comfy = meta["tool"]["comfy"]
    assert {"PublisherId", "DisplayName", "requires-comfyui"} <= set(comfy)
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    names = [ln.split(">")[0].split("=")[0].split("<")[0].strip() for ln in lines if ln]
    assert "torch" not in names and "diffusers" in names  # ComfyUI owns torch
    assert "test" in meta["project"]["optional-dependencies"]


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = next(ln for ln in ci if "pytest" in ln and not ln.startswith("#"))
    assert command in (ROOT / "README.md").read_text().splitlines()


def test_the_trainer_core_imports_no_toy_tool():
    core = "import trainer.train, trainer.evaluation, trainer.report, trainer.backends.random_init, trainer.compare"
    leaked = sorted(m for m in _modules_after(core) if m.startswith("trainer.toy"))
    assert not leaked, f"the trainer's core pulled in {leaked}"


def test_one_version_source():
    import comfy_pec

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert comfy_pec.__version__ == meta["project"]["version"]
