"""The train step compiled ahead of time for NVIDIA GPUs on this CPU host (jax's CUDA plugin from
requirements-gpu.txt, no GPU, no CUDA install), its memory held against what the shapes imply;
GPU names, the memory jax may use, and the one-line errors."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from magjax.bench import capacity, gpu_targets
from magjax.bench import compile as compile_bench

REPO = pathlib.Path(__file__).parent.parent
DEMO = f"{REPO}/configs/magface.py:demo"
GPUS, DIM = 2, 512
H100_BYTES = 81_559 * 2**20


def _compile(capsys, *argv):
    assert (
        compile_bench.main(["--topology", f"h100:{GPUS}", "--config", DEMO, *argv, "--json"]) == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1  # --json: the JSON line alone
    return json.loads(lines[0])


def test_demo_on_two_h100s_its_counts_the_overrides_and_memory_follow_the_shapes(capsys):
    # The demo recipe as shipped: its 300 synthetic identities, 128 images over the official
    # 8 GPUs' worth of batch (16 per GPU), float32.
    small = _compile(capsys, "--flops")
    assert small["device_kind"] == "NVIDIA H100 80GB HBM3" and small["chips"] == GPUS
    assert small["classes"] == 300 and small["per_chip_batch"] == 16
    assert small["arch"] == "magface_tiny" and small["dtype"] == "float32"
    assert small["hbm_bytes_per_chip"] == H100_BYTES
    assert small["usable_bytes_per_chip"] == int(0.75 * H100_BYTES) and small["fits"]
    assert small["bytes_per_chip"] == (
        small["argument_bytes"] + small["output_bytes"] - small["alias_bytes"] + small["temp_bytes"]
    )
    # Overrides as magjax.main takes them: 40,000 classes more, the batch from the global one.
    large = _compile(
        capsys, "--flops", "--config.data.num_classes=40300", "--config.global_batch", "128"
    )
    assert large["classes"] == 40_300 and large["per_chip_batch"] == 16
    assert large["overrides"] == ["--config.data.num_classes=40300", "--config.global_batch", "128"]
    rows = (large["classes"] - small["classes"]) // GPUS  # class centres per GPU
    centre_bytes = rows * DIM * 4  # float32
    delta = {
        key: large[key] - small[key]
        for key in small
        if isinstance(small[key], int | float) and not isinstance(small[key], bool)
    }
    # Each GPU holds its C/D centres and their momentum (replicated centres would be 2x here),
    # and the updated state overwrites the donated one.
    assert delta["argument_bytes"] == 2 * centre_bytes
    assert delta["output_bytes"] == delta["alias_bytes"] == 2 * centre_bytes
    assert small["output_bytes"] - small["alias_bytes"] < 2**16  # the metrics only
    # Temporaries: at most the centre gradient and two [C/D, B] float32 arrays per extra row.
    global_batch = 16 * GPUS
    assert 0 < delta["temp_bytes"] <= rows * (DIM + 2 * global_batch) * 4
    # FLOPs, counted on the same step compiled for the CPU: the head's three products.
    products = 3 * 2 * global_batch * rows * DIM
    assert products <= delta["flops_per_step"] <= 1.1 * products
    assert small["images_per_s_per_chip_at_peak"] == pytest.approx(
        16 * 989.5e12 / small["flops_per_step"]
    )
    # Bytes accessed, from the same CPU compile (an estimate of the GPU program's): the ceiling
    # is the slower of the FLOPs at 989.5 TFLOP/s and the bytes at the H100's 3,350 GB/s.
    floor = max(small["flops_per_step"] / 989.5e12, small["bytes_accessed_per_step"] / 3350e9)
    assert small["memory_bandwidth_bytes_per_s"] == 3350e9
    assert small["bytes_accessed_per_step"] > small["argument_bytes"]  # the state is read
    assert small["images_per_s_per_chip_ceiling"] == pytest.approx(16 / floor)


@pytest.mark.parametrize(
    "override, says",
    [
        ("--config.model.archh=tiny", "--config.model.archh: no such config field 'archh'"),
        ("--config.global_batch=abc", "--config.global_batch=abc: invalid literal for int()"),
    ],
)
def test_a_bad_override_is_one_line_naming_it(capsys, override, says):
    """In magjax.main's words: the field's type decides, a misspelt field is named."""
    argv = ["--topology", "h100:2", "--config", DEMO, override]
    assert compile_bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and says in err


def test_missing_gpu_packages_say_what_to_install(capsys, monkeypatch):
    monkeypatch.setattr(compile_bench, "_missing_gpu_packages", lambda: ["jax-cuda12-plugin"])
    assert compile_bench.main(["--topology", "a100-40gb", "--config", DEMO]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "jax-cuda12-plugin" in err and "requirements-gpu.txt" in err


def test_gpu_names_counts_and_the_memory_jax_may_use(monkeypatch):
    assert gpu_targets.parse_topology("h100") == ("h100", 8)
    assert gpu_targets.parse_topology("A100-40GB:4") == ("a100-40gb", 4)
    assert gpu_targets.parse_topology("v5e:2x2") is None
    with pytest.raises(ValueError, match="h100:0"):
        gpu_targets.parse_topology("h100:0")
    assert gpu_targets.pjrt_topology(8) == "1x1x8"
    assert gpu_targets.pjrt_topology(16) == "1x2x8"  # two servers of 8
    with pytest.raises(ValueError, match="multiple of 8"):
        gpu_targets.pjrt_topology(12)
    assert compile_bench.chip_facts("v100-32gb:8") == (32_510 * 2**20, 125e12)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    assert compile_bench.memory_budget("h200:8") == int(0.9 * 143_771 * 2**20)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "90")
    with pytest.raises(ValueError, match="XLA_PYTHON_CLIENT_MEM_FRACTION"):
        compile_bench.memory_budget("h200:8")
    config = gpu_targets.target_config(gpu_targets.GPUS["h100"])
    assert "cuda_compute_capability { major: 9 minor: 0 }" in config
    assert "core_count: 132" in config and f"device_memory_size: {H100_BYTES}" in config


def test_capacity_of_the_batch_on_gpus(monkeypatch, capsys):
    """``--of batch``'s wiring, with the compile replaced by linear memory: the largest
    multiple of 8 images whose step fits the 75% of an A100 40GB jax may use."""
    budget = int(0.75 * 40_960 * 2**20)

    def fake_run(topology, config, per_chip_batch, classes):
        used = 5 * 2**30 + 90 * 2**20 * per_chip_batch
        return {
            "bytes_per_chip": used,
            "fits": used <= budget,
            "compile_s": 0.0,
            "per_chip_batch": per_chip_batch,
        }

    monkeypatch.setattr(compile_bench, "run", fake_run)
    monkeypatch.setattr(compile_bench, "topology_devices", lambda topology: [None] * 8)
    argv = [
        "--topology",
        "a100-40gb:8",
        "--config",
        f"{REPO}/configs/arcface.py:r100",
        "--of",
        "batch",
    ]
    assert capacity.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    exact = (budget - 5 * 2**30) // (90 * 2**20)
    found = result["largest_batch"]
    assert found["per_chip_batch"] == exact // 8 * 8 and found["classes"] == 85_742
    assert found["first_failing"] == found["per_chip_batch"] + 8
    assert min(map(int, found["probes"])) == 128  # arcface_torch's 128 per GPU first
    assert result["usable_bytes_per_chip"] == budget


@pytest.mark.skipif(
    any(os.path.exists(d) for d in ("/dev/nvidia0", "/dev/nvidiactl")),
    reason="a GPU host: the CUDA plugin's check is meant to run there",
)
def test_the_cuda_plugin_is_quiet_on_a_cpu_host():
    """With requirements-gpu.txt installed, jax's CUDA plugin logs a traceback ("Unable to load
    cuDNN") when jax starts on a host without CUDA; once magjax is imported it loads quietly."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("JAX_PLATFORMS", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK")
    }
    code = (
        "import magjax; from jax._src import xla_bridge as xb; "
        "xb._discover_and_register_pjrt_plugins(); print('cuda' in xb._backend_factories)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and run.stdout.strip() == "True" and run.stderr == ""
