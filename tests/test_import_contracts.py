"""Enforced layering (issue 10): the import-linter contracts in pyproject.toml ``[tool.importlinter]`` hold.

``lint-imports`` (the import-linter CLI) runs from the repository root on this tree's ``fedaqt``; a second test
copies the package, adds a forbidden import (the quant core importing the server) and checks that the same
command then fails naming the broken contract, so the first test cannot pass vacuously.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports() -> str:
    exe = Path(sys.executable).with_name("lint-imports")
    found = str(exe) if exe.exists() else shutil.which("lint-imports")
    if not found:
        pytest.fail("lint-imports (package import-linter) is not installed: run scripts/setup.sh or "
                    ".venv/bin/pip install -e '.[test]'")
    return found


def run_lint(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with ``root``'s pyproject.toml on ``root``'s fedaqt package (not an installed copy)."""
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([_lint_imports(), "--no-cache", "--no-logo"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def test_import_contracts_are_kept():
    res = run_lint(ROOT)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "0 broken" in out and "KEPT" in out, out


def test_a_forbidden_import_breaks_its_contract(tmp_path):
    shutil.copytree(ROOT / "fedaqt", tmp_path / "fedaqt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    pack = tmp_path / "fedaqt" / "quant" / "pack.py"
    pack.write_text(pack.read_text() + "\nimport fedaqt.server.app  # noqa: E402,F401  (forbidden: quant -> server)\n")
    res = run_lint(tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "quant core imports nothing else of fedaqt BROKEN" in out, out
    assert "fedaqt.quant.pack -> fedaqt.server.app" in out, out


def test_launcher_contract_covers_every_package_module():
    """The "nothing imports the launcher except the front ends" contract lists its source modules (all but the CLI
    and the Flower app fedaqt.app, which run preflight and the run directory as `fedaqt run` does); a new top-level module
    or package of fedaqt must be added to it, or a launcher import from there would go unchecked."""
    import pkgutil

    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover
        import tomli as tomllib  # type: ignore[no-redef]
    import fedaqt

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    launcher = next(c for c in contracts if c.get("forbidden_modules") == ["fedaqt.launch"])
    modules = {f"fedaqt.{m.name}" for m in pkgutil.iter_modules(fedaqt.__path__)}
    assert set(launcher["source_modules"]) == modules - {"fedaqt.cli", "fedaqt.app", "fedaqt.launch"}
