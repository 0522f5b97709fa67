"""The train step compiled ahead of time for a Cloud TPU topology on this CPU host, its memory
held against what the shapes imply, and the capacity search."""

import json
import math
import pathlib

import pytest

from magjax.bench import capacity
from magjax.bench import compile as compile_bench

REPO = pathlib.Path(__file__).parent.parent
PER_CHIP_BATCH, DIM, CHIPS = 16, 512, 4


def test_tiny_recipe_on_v5e_memory_and_flops_follow_the_shapes(capsys):
    # The command line, as a user runs it (libtpu from requirements-tpu.txt), at two class
    # counts: what changes between them is the head alone.
    results = []
    for classes in (40_000, 80_000):
        argv = ["--topology", "v5e:2x2", "--config", f"{REPO}/configs/arcface.py:tiny",
                "--per-chip-batch", str(PER_CHIP_BATCH), "--classes", str(classes), "--json"]
        assert compile_bench.main(argv) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 1  # --json: the JSON line alone
        results.append(json.loads(lines[0]))
    small, large = results
    assert small["chips"] == CHIPS and small["device_kind"] == "TPU v5 lite"
    assert small["hbm_bytes_per_chip"] == 16 * 2**30 and small["fits"]
    assert small["bytes_per_chip"] == (small["argument_bytes"] + small["output_bytes"]
                                       - small["alias_bytes"] + small["temp_bytes"])
    rows = (large["classes"] - small["classes"]) // CHIPS  # class centres per chip
    centre_bytes = rows * DIM * 4  # float32
    delta = {key: large[key] - small[key] for key in small if isinstance(small[key], int | float)}
    # Arguments: each chip holds its C/D centres and their momentum (replicated centres would
    # be 4x, a bf16 or f64 copy 0.5x or 2x), and the updated state overwrites the donated one.
    assert delta["argument_bytes"] == 2 * centre_bytes
    assert delta["output_bytes"] == delta["alias_bytes"] == 2 * centre_bytes
    assert small["output_bytes"] - small["alias_bytes"] < 2**16  # the metrics only
    # Temporaries: at most the centre gradient and two [C/D, B] float32 arrays per extra row.
    global_batch = PER_CHIP_BATCH * CHIPS
    assert 0 < delta["temp_bytes"] <= rows * (DIM + 2 * global_batch) * 4
    # FLOPs: the three products of the head (logits, embedding and centre gradients), once each.
    products = 3 * 2 * global_batch * rows * DIM
    assert products <= delta["flops_per_step"] <= 1.1 * products
    assert small["images_per_s_per_chip_at_peak"] == pytest.approx(
        PER_CHIP_BATCH * 197e12 / small["flops_per_step"])


def test_demo_recipe_on_a_tpu_topology_with_overrides(monkeypatch, capsys):
    """The demo recipe compiles for a TPU topology: its class and image counts come from its
    synthetic options (300 x 50), and --config. overrides take effect as in magjax.main. The
    XLA compile itself is the tiny recipe's test above; here it is replaced to stay fast."""
    seen = {}

    def fake_compile(config, devices, per_chip_batch):
        seen.update(config=config, devices=devices, per_chip_batch=per_chip_batch)
        return {"argument_bytes": 1, "output_bytes": 1, "alias_bytes": 1, "temp_bytes": 1,
                "bytes_per_chip": 2, "flops_per_step": 1e9, "compile_s": 0.0}

    monkeypatch.setattr(compile_bench, "compile_train_step", fake_compile)
    argv = ["--topology", "v5e:2x2", "--config", f"{REPO}/configs/magface.py:demo",
            "--config.model.arch=tiny", "--config.data.synthetic_options.num_identities=500",
            "--config.global_batch=64", "--json"]
    assert compile_bench.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    config = seen["config"]
    assert config.model.arch == "tiny" and result["arch"] == "tiny"
    assert config.data.num_classes == result["classes"] == 500
    assert config.data.num_examples == 500 * 50
    assert seen["per_chip_batch"] == result["per_chip_batch"] == 64 // 8  # MagFace's 8 GPUs
    assert len(seen["devices"]) == CHIPS and result["device_kind"] == "TPU v5 lite"


def test_a_step_too_large_for_the_chip_reports_fits_false(monkeypatch, capsys):
    """XLA's RESOURCE_EXHAUSTED at compile time is a result (fits: false and the bytes asked
    for), not a traceback. The compile is replaced by one that refuses as XLA does."""
    import jax

    from magjax import train

    class Refused:
        def lower(self, *args):
            return self

        def compile(self):
            raise jax.errors.JaxRuntimeError(
                "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in "
                "memory space hbm. Used 180.56G of 15.75G hbm. Exceeded hbm capacity by 164.8G."
                " ... the total memory required for HLO temporaries (180.56G) exceeds "
                "available HBM (15.75G)")

    monkeypatch.setattr(train, "jit_train_step", lambda *args: Refused())
    argv = ["--topology", "v5e:2x2", "--config", f"{REPO}/configs/arcface.py:tiny", "--json"]
    assert compile_bench.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["fits"] is False
    assert result["temp_bytes_asked"] == result["bytes_per_chip"] == int(180.56 * 2**30)
    assert result["error"].startswith("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error")
    assert "DOES NOT FIT: XLA asked for 180.56 GiB of temporaries per chip" in (
        compile_bench.describe(result))


def test_unknown_topology_is_named(capsys):
    with pytest.raises(ValueError, match="v9x"):
        compile_bench.chip_facts("v9x:2x2")
    argv = ["--topology", "v5e:9x9x9", "--config", f"{REPO}/configs/arcface.py:tiny"]
    assert compile_bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "v5e:9x9x9" in err and "requirements-tpu.txt" in err


@pytest.mark.parametrize("intercept, slope, budget, start", [
    (3e9, 600, 95 * 2**30, 85_742),       # full softmax on a large chip
    (3e9, 600, 16 * 2**30, 85_742),
    (1e9, 50_000, 16 * 2**30, 85_742),    # a steep head: few thousand classes more
    (1e9, 6.0, 95 * 2**30, 2_000_000),    # Partial FC: billions
])
def test_capacity_search_brackets_the_largest_count(intercept, slope, budget, start):
    multiple = 256

    def bytes_at(count):  # linear memory plus a small curvature, like the compiled step's
        return int(intercept + slope * count + 1000 * math.sqrt(count))

    found, probes = capacity.largest_fitting(bytes_at, budget, start, multiple, tolerance=0.01)
    exact = found
    while bytes_at(exact + multiple) <= budget:
        exact += multiple
    assert bytes_at(found) <= budget and found % multiple == 0
    assert exact - found <= 0.01 * exact  # within the tolerance of the true capacity
    failing = min(c for c, b in probes.items() if b > budget)
    assert failing - found <= 0.01 * found + multiple  # and a probe just above proves it
    assert len(probes) <= 7  # near-linear memory: a handful of compiles, not a bisection's 20


def test_line_estimate_of_linear_memory_is_its_capacity():
    probes = {100_000: 3 * 10**9 + 600 * 100_000, 200_000: 3 * 10**9 + 600 * 200_000}
    assert capacity.line_estimate(probes, 3 * 10**9 + 600 * 5_000_000) == 5_000_000
    assert capacity.line_estimate({100_000: 10**9}, 2 * 10**9) is None


def test_capacity_is_zero_when_nothing_fits():
    found, probes = capacity.largest_fitting(lambda count: 10**12, 10**9, 100_000, 256)
    assert found == 0 and 256 in probes


def test_capacity_command_searches_each_sample_rate(monkeypatch, capsys):
    """The command's wiring, with the compile replaced by linear memory: r = 0.1 first, then
    r = 1.0 from where it ended, each within the tolerance, the line's estimate reported."""
    def fake_run(topology, config, per_chip_batch, classes):
        per_class = 200 + 4_000 * config.head.sample_rate
        used = 6 * 2**30 + int(per_class * classes)
        return {"bytes_per_chip": used, "fits": used <= 16 * 2**30, "compile_s": 0.0,
                "per_chip_batch": per_chip_batch or 128}

    monkeypatch.setattr(compile_bench, "run", fake_run)
    monkeypatch.setattr(compile_bench, "topology_devices", lambda topology: [None] * 4)
    argv = ["--topology", "v5e:2x2", "--config", f"{REPO}/configs/arcface.py:r100,pfc0.1",
            "--classes", "100000", "--tolerance", "0.01"]
    assert capacity.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for rate in ("0.1", "1.0"):
        exact = 10 * 2**30 / (200 + 4_000 * float(rate))
        found = result["capacity"][rate]
        assert 0.99 * exact <= found["classes"] <= exact < found["first_failing"]
        assert abs(found["line_estimate"] - exact) <= 32
    assert min(map(int, result["capacity"]["0.1"]["probes"])) == 100_000 - 100_000 % 32
