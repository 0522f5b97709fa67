"""``pip install .`` from a clean copy of the checkout into a fresh virtualenv, then training with
a shipped recipe (``--config magjax:magface:demo``) from a directory outside the checkout."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest

REPO = pathlib.Path(__file__).parent.parent


@pytest.mark.slow
def test_pip_install_then_train_outside_the_checkout(tmp_path):
    from test_train import SYNTHETIC

    from magjax import data

    checkout = tmp_path / "checkout"
    shutil.copytree(
        REPO,
        checkout,
        ignore=shutil.ignore_patterns(
            ".git", ".venv*", "runs", "build", "*.egg-info", "__pycache__", ".*_cache"
        ),
    )
    # A fresh virtualenv that reuses this interpreter's packages (jax, pip, setuptools) through
    # a .pth file instead of downloading them again; magjax itself is not among them.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    pathlib.Path(site.stdout.strip(), "reuse.pth").write_text(
        "\n".join({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}) + "\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    def run(*args, **kwargs):
        result = subprocess.run(
            [str(python), *args],
            cwd=outside,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            **kwargs,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    run(
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        str(checkout),
    )
    installed = pathlib.Path(run("-c", "import magjax; print(magjax.__file__)").strip()).parent
    assert installed.is_relative_to(venv), installed
    # Every module of the checkout is installed, the recipes as magjax/configs.
    shipped = {p.relative_to(installed).as_posix() for p in installed.rglob("*.py")}
    expected = {p.relative_to(REPO / "magjax").as_posix() for p in (REPO / "magjax").rglob("*.py")}
    expected |= {f"configs/{p.name}" for p in (REPO / "configs").glob("*.py")}
    assert shipped == expected
    assert (installed.parent / "magjax-0.1.0.dist-info" / "licenses" / "LICENSE").is_file()

    dataset = data.prepare("synthetic", None, tmp_path / "data", **SYNTHETIC)
    workdir = tmp_path / "run"
    run(
        "-m",
        "magjax.main",
        "--config",
        "magjax:magface:demo",
        "--workdir",
        str(workdir),
        f"--config.data.dir={dataset}",
        "--config.data.synthetic=False",
        "--config.model.embedding_dim=32",
        "--config.global_batch=8",
        "--config.total_steps=2",
        "--config.cpu_devices=1",
        "--config.eval.heldout_sets=False",
    )
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 2
    assert json.loads((workdir / "model" / "model.json").read_text())["arch"] == "magface_tiny"

    result = subprocess.run(
        [
            str(python),
            "-m",
            "magjax.main",
            "--config",
            "magjax:nosuchloss",
            "--workdir",
            str(workdir),
        ],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    message = result.stderr.strip()
    assert "\n" not in message and message.startswith(
        "error: --config magjax:nosuchloss: no recipe 'nosuchloss'; shipped recipes: "
    )
    assert "arcface" in message and "magface" in message
