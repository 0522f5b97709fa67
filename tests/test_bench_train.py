"""``python -m magjax.bench train`` on the CPU: the whole train step beside PyTorch's, with none
of the data or checkpoint stack imported (a GPU machine may have only jax, flax, optax, numpy,
ml-collections and torch)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).parent.parent
# Importing any of these raises ImportError in the benchmark's process.
ABSENT = (
    "grain",
    "tensorflow_datasets",
    "array_record",
    "tensorstore",
    "orbax",
    "tensorboardX",
    "tensorflow",
)

SCRIPT = f"""
import sys
for name in {ABSENT!r}:
    sys.modules[name] = None
from magjax.bench.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_bench_train_runs_without_the_data_stack_and_times_torch():
    argv = [
        "train",
        "--arch",
        "tiny",
        "--batch",
        "8",
        "--classes",
        "64",
        "--dtype",
        "float32",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--torch",
    ]
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, *argv], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["magjax_devices"] == 2 and result["magjax_device_kind"] == "cpu"
    assert result["torch_device_kind"] == "cpu"
    for side in ("magjax", "torch"):
        assert result[f"{side}_images_per_s"] > 0
        assert result[f"{side}_images_per_s"] * result[f"{side}_step_ms"] / 1e3 == pytest.approx(8)
    ratio = result["magjax_images_per_s"] / result["torch_images_per_s"]
    assert result["magjax_over_torch"] == pytest.approx(ratio)
