"""Packaging: `import trl_safeppo` and `trl-safeppo --help` stay light (no torch / transformers / trl / datasets),
both entry points work, and every lazy public name resolves."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import trl_safeppo

HEAVY = ("torch", "transformers", "trl", "datasets", "accelerate", "peft")


def _heavy_imported_by(code: str) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_is_light():
    assert _heavy_imported_by("import trl_safeppo") == []


def test_cli_help_is_light():
    # building the parser imports every COMMANDS module: their heavy imports must stay inside functions
    assert _heavy_imported_by("from trl_safeppo.cli import build_parser; build_parser()") == []


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)


def test_console_script_help():
    script = Path(sys.executable).with_name("trl-safeppo")
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable} (pip install -e . creates it)")
    result = _run([str(script), "--help"])
    assert result.returncode == 0, result.stderr
    assert "usage: trl-safeppo" in result.stdout and "tiny" in result.stdout


def test_python_m_help_and_version():
    result = _run([sys.executable, "-m", "trl_safeppo", "--help"])
    assert result.returncode == 0, result.stderr
    assert "usage: trl-safeppo" in result.stdout
    version = _run([sys.executable, "-m", "trl_safeppo", "--version"])
    assert version.stdout.strip() == f"trl-safeppo {trl_safeppo.__version__}"


def test_cli_bad_tiny_name_is_one_clear_line():
    result = _run([sys.executable, "-m", "trl_safeppo", "tiny", "path", "tiny://unknown-name"])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "'tiny://unknown-name'" in result.stderr and "tiny://arithmetic, tiny://debug" in result.stderr


@pytest.mark.parametrize("name", [n for n in trl_safeppo.__all__ if n != "__version__"])
def test_lazy_name_resolves(name):
    module = trl_safeppo._LAZY[name]
    full = "trl_safeppo" + module
    try:
        importlib.import_module(full)
    except ModuleNotFoundError as err:
        if err.name == full or full.startswith(f"{err.name}."):
            pytest.skip(f"{full} does not exist yet (built by another part of the project)")
        raise
    assert getattr(trl_safeppo, name) is getattr(sys.modules[full], name)
    assert name in dir(trl_safeppo)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        trl_safeppo.nope  # noqa: B018


def test_wheel_ships_the_recipes(tmp_path):
    # a pip user has no repository: the wheel carries recipes/ (as trl_safeppo/recipes, a link in the tree) so that
    # `trl-safeppo run demo` and the accelerate launch configs work after `pip install`
    import shutil
    import zipfile

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    shutil.copytree(root / "recipes", src / "recipes")
    shutil.copytree(root / "trl_safeppo", src / "trl_safeppo", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src), "-w", str(tmp_path)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0 and "No module named pip" in proc.stderr:
        pytest.skip("pip is not available in this environment")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("trl_safeppo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"trl_safeppo/recipes/{p.relative_to(root / 'recipes')}" for p in (root / "recipes").rglob("*.yaml")}
    assert expected and expected <= names
