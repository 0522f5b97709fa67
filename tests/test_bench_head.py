"""``python -m magjax.bench head``: the Partial FC step with a sampled-rows gradient
(``--freeze-unsampled``) compiles without the dense centre gradient, the floor covers every
device, and the dense step also reports the write of its gradient."""

import json

import pytest

from magjax.bench import head as head_bench

CLASSES, DIM = 40_000, 64


def _bytes(capsys, *extra):
    argv = [
        "--abstract",
        "--batch",
        "64",
        "--classes",
        str(CLASSES),
        "--dim",
        str(DIM),
        "--sample-rate",
        "0.1",
        *extra,
    ]
    assert head_bench.main(argv) in (0, None)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bytes_per_device"]


def test_sampled_rows_step_has_no_dense_centre_gradient(capsys):
    dense, rows = _bytes(capsys), _bytes(capsys, "--freeze-unsampled")
    centre_array = CLASSES * DIM * 4
    # Both hold the [C, d] centres as an argument; the dense step also outputs a [C, d]
    # gradient, the sampled-rows step a [C/10, d] one.
    assert dense - rows >= 0.8 * centre_array, (dense, rows)


def test_timed_run_over_eight_devices_times_the_floor_on_all_of_them(capsys):
    argv = [
        "--batch",
        "64",
        "--classes",
        "4000",
        "--dim",
        "32",
        "--devices",
        "8",
        "--sample-rate",
        "0.5",
        "--freeze-unsampled",
        "--repeats",
        "2",
    ]
    assert head_bench.main(argv) in (0, None)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # The floor's FLOPs are every device's products (8 shards of the sampled rows), not one
    # device's: fake CPU devices share the cores, so one device's floor would be 8x too low.
    flops = result["floor_gflops_per_s"] * 1e6 * result["floor_ms"]
    assert abs(flops / (3 * 2 * 64 * 8 * result["centres_per_device"] * 32) - 1) < 0.05
    assert result["step_ms"] > 0 and result["ratio"] > 0


def test_dense_partial_fc_step_also_reports_the_dense_write(capsys):
    argv = [
        "--batch",
        "32",
        "--classes",
        "4000",
        "--dim",
        "32",
        "--sample-rate",
        "0.25",
        "--repeats",
        "2",
    ]
    assert head_bench.main(argv) in (0, None)
    dense = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert dense["dense_write_ms"] > 0
    combined = dense["step_ms"] / (dense["floor_ms"] + dense["dense_write_ms"])
    # The figures are rounded to 0.01 ms, a few percent of these tiny steps.
    assert dense["ratio_with_dense_write"] == pytest.approx(combined, rel=0.05)
    # The sampled-rows gradient writes no dense array: no such figure.
    assert head_bench.main(argv + ["--freeze-unsampled"]) in (0, None)
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "dense_write_ms" not in rows and rows["ratio"] > 0


@pytest.mark.parametrize("sampled_rows", [False, True])
def test_update_step_updates_the_centres_in_place_against_its_floor(capsys, sampled_rows):
    argv = [
        "--batch",
        "32",
        "--classes",
        "4000",
        "--dim",
        "32",
        "--sample-rate",
        "0.1",
        "--repeats",
        "2",
        "--update",
    ] + (["--freeze-unsampled"] if sampled_rows else [])
    assert head_bench.main(argv) in (0, None)
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert out.count("head step") == 1, out
    # The floor is the products plus the update alone (every row, or the sampled ones).
    products = min(result["floor_class_major_ms"], result["floor_batch_major_ms"])
    assert result["floor_ms"] == pytest.approx(products + result["update_floor_ms"], abs=0.02)
    assert result["update_floor_ms"] > 0 and "dense_write_ms" not in result
    # With the sampled rows alone, also their update where they lie, timed in the step's state.
    assert ("sampled_rows_update_ms" in result) == sampled_rows
    assert result.get("sampled_rows_update_ms", 1) > 0
    # The centres and their momentum are donated: the new ones take their buffers, so the
    # step holds about two [C, d] arrays, not four.
    centre_array = result["weight_bytes_per_device"]
    assert 2 * centre_array <= result["bytes_per_device"] < 3 * centre_array


def test_bench_times_the_head_code_the_train_step_runs(monkeypatch, capsys):
    """`bench head` and the train step reach the head through the same methods of the same
    class (``head.ClassShardedHead.update``, which differentiates through ``value_and_grad``),
    on heads built alike from the bench's flags and from a training config: no second copy
    of the step to drift from training."""
    import jax

    from magjax import head, parallel, recipes, train_step

    calls = []
    for name in ("update", "value_and_grad"):
        original = getattr(head.ClassShardedHead, name)

        def spy(self, *args, _name=name, _original=original):
            calls.append((_name, self))
            return _original(self, *args)

        monkeypatch.setattr(head.ClassShardedHead, name, spy)

    classes, dim, batch = 512, 32, 16
    flags = [
        "--abstract",
        "--batch",
        str(batch),
        "--classes",
        str(classes),
        "--dim",
        str(dim),
        "--devices",
        "8",
        "--sample-rate",
        "0.25",
        "--freeze-unsampled",
    ]
    assert head_bench.main(flags + ["--update"]) in (0, None)
    bench_update, calls[:] = list(calls), []
    assert head_bench.main(flags) in (0, None)
    bench_gradient, calls[:] = list(calls), []
    capsys.readouterr()

    config = recipes.get_config("arcface", "tiny,pfc0.25")
    config.model.update(dtype="float32", embedding_dim=dim)
    config.head.freeze_unsampled = True
    config.global_batch = batch
    mesh = parallel.make_mesh(8)
    components = train_step.build_components(
        config, mesh, classes, steps_per_epoch=10, total_steps=40
    )
    jax.eval_shape(
        train_step.make_train_step(components, jax.random.key(0)),
        train_step.abstract_state(components),
        train_step.abstract_batch(mesh, batch),
    )
    assert [name for name, _ in calls] == ["update", "value_and_grad"]
    assert [name for name, _ in bench_update] == ["update", "value_and_grad"]
    assert [name for name, _ in bench_gradient] == ["value_and_grad"]
    trained = calls[0][1]
    assert trained.sampled_rows
    # Equal in every setting (loss, mesh, classes, dim, rate, freezing, rows' gradient, ...).
    for _, bench_head in bench_update + bench_gradient:
        assert bench_head == trained
