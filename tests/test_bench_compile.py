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


def compile_tiny_on_v5e(capsys, classes: int, *overrides: str) -> dict:
    """``bench compile --json`` of the tiny recipe on v5e:2x2, as a user runs it (libtpu from
    requirements-tpu.txt), at ``classes`` classes: its one JSON line."""
    argv = [
        "--topology",
        "v5e:2x2",
        "--config",
        f"{REPO}/configs/arcface.py:tiny",
        "--per-chip-batch",
        str(PER_CHIP_BATCH),
        "--classes",
        str(classes),
        *overrides,
        "--json",
    ]
    assert compile_bench.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1  # --json: the JSON line alone
    return json.loads(lines[0])


def test_tiny_recipe_on_v5e_memory_and_flops_follow_the_shapes(capsys):
    # At two class counts: what changes between them is the head alone.
    results = [compile_tiny_on_v5e(capsys, classes) for classes in (40_000, 80_000)]
    small, large = results
    assert small["chips"] == CHIPS and small["device_kind"] == "TPU v5 lite"
    assert small["hbm_bytes_per_chip"] == 16 * 2**30 and small["fits"]
    assert small["head_block"] is None  # the dense head: its logits take 0.1% of the chip
    assert small["bytes_per_chip"] == (
        small["argument_bytes"] + small["output_bytes"] - small["alias_bytes"] + small["temp_bytes"]
    )
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
        PER_CHIP_BATCH * 197e12 / small["flops_per_step"]
    )
    # Bytes accessed: at least the centres and their momentum read and written once by the
    # update; at most 16 passes over a chip's centres (their normalisation and its backward,
    # the products, the gradient, the update: measured 11.2).
    assert 4 * centre_bytes <= delta["bytes_accessed_per_step"] <= 16 * centre_bytes
    # The floor is the larger of the two times, at v5e's 197 TFLOP/s and 819 GB/s: this tiny
    # step (0.95 GB for 3e9 FLOPs) is memory-bound, 80x below what its FLOPs alone allow.
    floor = max(small["flops_per_step"] / 197e12, small["bytes_accessed_per_step"] / 819e9)
    assert small["memory_bandwidth_bytes_per_s"] == 819e9 and small["bound"] == "memory"
    assert small["step_s_floor"] == pytest.approx(floor)
    assert small["images_per_s_per_chip_ceiling"] == pytest.approx(PER_CHIP_BATCH / floor)
    assert small["images_per_s_per_chip_ceiling"] < small["images_per_s_per_chip_at_peak"] / 50


# vit_demo (patch 9, D 64, depth 2, MLP 256, 144 tokens): forward multiply-adds per image, by
# layer: patch embedding 144 x 243 x 64 = 2,239,488; per block qkv 1,769,472, scores and
# attention x V 2 x 1,327,104, proj 589,824, MLP 2 x 2,359,296 (9,732,096, twice); the
# embedding head 9,216 x 64 + 64 x 512 = 622,592.
VIT_DEMO_MACS, VIT_DEMO_PATCH_MACS, VIT_DEMO_PARAMS = 22_326_272, 2_239_488, 748_352


def test_vit_b_recipe_compiles_for_a_tpu_topology():
    """The ViT-B recipe's train step (CosFace, Partial FC 0.3, AdamW, 12 accumulated
    micro-batches) compiled for v5e:2x2 with the reduced class count and magjax's small ViT
    (the same code path as vit_b at a CPU test's cost): its state and FLOPs follow the shapes."""
    classes, batch = 4_000, 8
    config = compile_bench.load_config(
        f"{REPO}/configs/arcface.py:vit_b", ["--config.model.arch=vit_demo"]
    )
    result = compile_bench.run("v5e:2x2", config, per_chip_batch=batch, classes=classes)
    assert result["arch"] == "vit_demo" and result["loss"] == "cosface" and result["fits"]
    assert result["sample_rate"] == 0.3 and result["chips"] == CHIPS
    # The state: parameters, AdamW's two moments and MultiSteps' accumulated gradient, all
    # float32, of the (replicated) backbone and of each chip's C/D class centres; TPU tiles pad
    # the small arrays (a [64] bias takes 4 KB): measured 5.8% more.
    weights = VIT_DEMO_PARAMS + classes // CHIPS * DIM
    assert 4 * 4 * weights <= result["argument_bytes"] <= 1.1 * 4 * 4 * weights
    # FLOPs: forward, and backward twice it (the patch embedding's input gradient is not
    # needed), per image; plus the head's three products over the 0.3 x 1,000 sampled centres
    # and the global batch; the rest (normalisations, softmax, AdamW) within 15% (measured 12%).
    backbone = 6 * VIT_DEMO_MACS - 2 * VIT_DEMO_PATCH_MACS
    head = 3 * 2 * batch * CHIPS * (classes // CHIPS * 3 // 10) * DIM
    assert 1.0 <= result["flops_per_step"] / (batch * backbone + head) <= 1.15
    assert result["step_s_floor"] == pytest.approx(
        max(result["flops_per_step"] / 197e12, result["bytes_accessed_per_step"] / 819e9)
    )


def test_demo_recipe_on_a_tpu_topology_with_overrides(monkeypatch, capsys):
    """The demo recipe compiles for a TPU topology: its class and image counts come from its
    synthetic options (300 x 50), and --config. overrides take effect as in magjax.main. The
    XLA compile itself is the tiny recipe's test above; here it is replaced to stay fast."""
    seen = {}

    def fake_compile(config, devices, per_chip_batch, memory_bytes=None):
        seen.update(config=config, devices=devices, per_chip_batch=per_chip_batch)
        return {
            "argument_bytes": 1,
            "output_bytes": 1,
            "alias_bytes": 1,
            "temp_bytes": 1,
            "bytes_per_chip": 2,
            "flops_per_step": 1e9,
            "bytes_accessed_per_step": None,
            "compile_s": 0.0,
        }

    monkeypatch.setattr(compile_bench, "compile_train_step", fake_compile)
    argv = [
        "--topology",
        "v5e:2x2",
        "--config",
        f"{REPO}/configs/magface.py:demo",
        "--config.model.arch=tiny",
        "--config.data.synthetic_options.num_identities=500",
        "--config.global_batch=64",
        "--json",
    ]
    assert compile_bench.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    config = seen["config"]
    assert config.model.arch == "tiny" and result["arch"] == "tiny"
    assert config.data.num_classes == result["classes"] == 500
    assert config.data.num_examples == 500 * 50
    assert seen["per_chip_batch"] == result["per_chip_batch"] == 64 // 8  # MagFace's 8 GPUs
    assert len(seen["devices"]) == CHIPS and result["device_kind"] == "TPU v5 lite"


@pytest.mark.parametrize(
    "topology, flops, bytes_accessed, bound, floor",
    [
        # 1e13 FLOPs at v5p's 459 TFLOP/s: 21.8 ms; 2e10 bytes at 2,765 GB/s: 7.2 ms.
        ("v5p:2x2x1", 1e13, 2e10, "compute", 1e13 / 459e12),
        # The same step on a v5e (197 TFLOP/s, 819 GB/s): 50.8 ms against 24.4 ms.
        ("v5e:2x2", 1e13, 2e10, "compute", 1e13 / 197e12),
        # Ten times the bytes: 244 ms at v5e's bandwidth, memory-bound.
        ("v5e:2x2", 1e13, 2e11, "memory", 2e11 / 819e9),
        ("v6e:2x2", 1e13, 2e11, "memory", 2e11 / 1638e9),
        ("v4:2x2x1", 1e13, 2e11, "memory", 2e11 / 1200e9),
    ],
)
def test_the_ceiling_is_the_slower_of_compute_and_memory(
    monkeypatch, topology, flops, bytes_accessed, bound, floor
):
    """The step's floor is the larger of its FLOPs at the chip's peak rate and its bytes
    accessed at the chip's HBM bandwidth; the ceiling is the per-chip batch over it. The
    compile is replaced by its figures (the tiny recipe's test compiles for real)."""

    def fake_compile(config, devices, per_chip_batch, memory_bytes=None):
        return {
            "argument_bytes": 1,
            "output_bytes": 1,
            "alias_bytes": 0,
            "temp_bytes": 1,
            "bytes_per_chip": 3,
            "flops_per_step": flops,
            "bytes_accessed_per_step": bytes_accessed,
            "compile_s": 0.0,
        }

    monkeypatch.setattr(compile_bench, "compile_train_step", fake_compile)
    config = compile_bench.load_config(f"{REPO}/configs/arcface.py:tiny", [])
    result = compile_bench.run(topology, config, per_chip_batch=128)
    assert result["bound"] == bound
    assert result["step_s_floor"] == pytest.approx(floor)
    assert result["images_per_s_per_chip_ceiling"] == pytest.approx(128 / floor)
    # The FLOPs-only figure stays, for comparison, and is never below the ceiling.
    assert result["images_per_s_per_chip_at_peak"] >= result["images_per_s_per_chip_ceiling"]
    lines = compile_bench.describe(result).splitlines()
    assert f"{bound}-bound, at most {128 / floor:.0f} images/s per chip" in lines[-1]


def test_a_step_too_large_for_the_chip_reports_fits_false(monkeypatch, capsys):
    """XLA's RESOURCE_EXHAUSTED at compile time is a result (fits: false and the bytes asked
    for), not a traceback. The compile is replaced by one that refuses as XLA does."""
    import jax

    from magjax import train_step

    class Refused:
        def lower(self, *args):
            return self

        def compile(self):
            raise jax.errors.JaxRuntimeError(
                "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in "
                "memory space hbm. Used 180.56G of 15.75G hbm. Exceeded hbm capacity by 164.8G."
                " ... the total memory required for HLO temporaries (180.56G) exceeds "
                "available HBM (15.75G)"
            )

    monkeypatch.setattr(train_step, "jit_train_step", lambda *args: Refused())
    argv = ["--topology", "v5e:2x2", "--config", f"{REPO}/configs/arcface.py:tiny", "--json"]
    assert compile_bench.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["fits"] is False
    assert result["temp_bytes_asked"] == result["bytes_per_chip"] == int(180.56 * 2**30)
    assert result["error"].startswith("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error")
    assert "DOES NOT FIT: XLA asked for 180.56 GiB of temporaries per chip" in (
        compile_bench.describe(result)
    )


def test_unknown_topology_is_named(capsys):
    with pytest.raises(ValueError, match="v9x"):
        compile_bench.chip_facts("v9x:2x2")
    argv = ["--topology", "v5e:9x9x9", "--config", f"{REPO}/configs/arcface.py:tiny"]
    assert compile_bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "v5e:9x9x9" in err and "requirements-tpu.txt" in err


@pytest.mark.parametrize(
    "intercept, slope, budget, start",
    [
        (3e9, 600, 95 * 2**30, 85_742),  # full softmax on a large chip
        (3e9, 600, 16 * 2**30, 85_742),
        (1e9, 50_000, 16 * 2**30, 85_742),  # a steep head: few thousand classes more
        (1e9, 6.0, 95 * 2**30, 2_000_000),  # Partial FC: billions
    ],
)
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
        return {
            "bytes_per_chip": used,
            "fits": used <= 16 * 2**30,
            "compile_s": 0.0,
            "per_chip_batch": per_chip_batch or 128,
        }

    monkeypatch.setattr(compile_bench, "run", fake_run)
    monkeypatch.setattr(compile_bench, "topology_devices", lambda topology: [None] * 4)
    argv = [
        "--topology",
        "v5e:2x2",
        "--config",
        f"{REPO}/configs/arcface.py:r100,pfc0.1",
        "--classes",
        "100000",
        "--tolerance",
        "0.01",
    ]
    assert capacity.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for rate in ("0.1", "1.0"):
        exact = 10 * 2**30 / (200 + 4_000 * float(rate))
        found = result["capacity"][rate]
        assert 0.99 * exact <= found["classes"] <= exact < found["first_failing"]
        assert abs(found["line_estimate"] - exact) <= 32
    assert min(map(int, result["capacity"]["0.1"]["probes"])) == 100_000 - 100_000 % 32


def test_a_head_whose_logits_would_take_half_the_chip_is_blocked(capsys):
    """The head's memory rule through the command line: on v5e:2x2 (16 GiB a chip, 64 images),
    70 M classes of 8-dimensional centres give each chip 17.5 M rows, whose dense [C/D, B]
    float32 logits and their gradient would take 8.96 GB, over half the chip: the step compiles
    with the classes 8,192 at a time, its temporaries far below one [C/D, B] array."""
    result = compile_tiny_on_v5e(capsys, 70_000_000, "--config.model.embedding_dim=8")
    assert result["head_block"] == 8192 and result["fits"]
    rows, batch = 70_000_000 // CHIPS, PER_CHIP_BATCH * CHIPS
    assert result["temp_bytes"] < rows * batch * 4 / 4
    assert "head 8,192 classes at a time" in compile_bench.describe(result)
