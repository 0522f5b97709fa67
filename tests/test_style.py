"""The code's style is part of CI: ``ruff check`` (the lint rules of pyproject.toml) and
``ruff format --check`` (one formatting style) over the package, the tests and the configs,
with the ruff that requirements-dev.txt pins."""

import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PATHS = ["magjax", "tests", "configs"]


def _ruff() -> str:
    beside_python = pathlib.Path(sys.executable).with_name("ruff")
    found = str(beside_python) if beside_python.exists() else shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed: pip install -r requirements-dev.txt")
    return found


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
    result = subprocess.run([_ruff(), *command, *PATHS], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
