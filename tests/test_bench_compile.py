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


def test_capacity_is_zero_when_nothing_fits():
    found, probes = capacity.largest_fitting(lambda count: 10**12, 10**9, 100_000, 256)
    assert found == 0 and 256 in probes
