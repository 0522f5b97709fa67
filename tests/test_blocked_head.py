"""The head that visits the classes block by block (``head.block_size``) against the dense head:
every loss, on one device and on 8 fake ones, with Partial FC, and its compiled memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES

from magjax import config_check, head, losses, recipes
from magjax.losses import blocked
from magjax.parallel import DATA_AXIS, make_mesh, padded_size
from magjax.refcheck import loss_cases

# Every registered loss, each with what its blocks must reproduce switched on: arcface_torch's
# probability floor and straight-through gradient (arcface, combined), its inter-class
# filtering (cosface), MagFace's magnitude gradient, AdaFace's and CurricularFace's state (a
# fast EMA, so that one step moves it) and CurricularFace's re-weighted hard non-targets.
LOSSES = {
    "arcface": losses.MarginLoss.create("arcface"),
    "cosface": losses.MarginLoss.create("cosface", interclass_filtering_threshold=0.1),
    "combined": losses.MarginLoss.create("combined"),
    "magface": losses.MarginLoss.create("magface"),
    "adaface": losses.MarginLoss.create("adaface", t_alpha=0.5),
    "curricularface": losses.MarginLoss.create("curricularface", t_alpha=0.5),
}
CLASSES, BATCH = 37, 13  # 8 devices: 40 padded classes, 5 per shard; 16 padded samples


def test_every_registered_loss_is_covered():
    assert set(LOSSES) == set(losses.registered())


def problem(seed, batch=BATCH, classes=CLASSES, dim=16):
    """Raw embeddings of varied norms, some near their centre, and sample 0 opposite its own
    centre with 4 classes along it: its loss (~120) is above arcface_torch's cap of 69.08."""
    rng = np.random.default_rng(seed)
    W = rng.normal(0, 0.05, (classes, dim))
    y = rng.integers(0, classes, batch)
    y[0] = 0
    x = rng.normal(size=(batch, dim)) * rng.uniform(5, 120, (batch, 1))
    x[1 : batch // 2] += 3 * W[y[1 : batch // 2]] / 0.05
    # Not exactly opposite: sqrt(1 - c^2)'s derivative is infinite at c = -1.
    W[0] = -0.05 * x[0] / np.linalg.norm(x[0]) + rng.normal(0, 1e-3, dim)
    W[1:5] = 0.05 * x[0] / np.linalg.norm(x[0]) + rng.normal(0, 1e-3, (4, dim))
    return x, W, y


def assert_same(got, expected, fields=("loss", "grad_embeddings", "grad_weight")):
    """Loss, gradients and state to 1e-12 of each field's largest value."""
    for key in fields:
        want = np.asarray(expected[key])
        np.testing.assert_allclose(
            got[key], want, rtol=1e-12, atol=1e-12 * np.abs(want).max(), err_msg=key
        )
    for key, want in expected["state_after"].items():
        np.testing.assert_allclose(got["state_after"][key], want, rtol=1e-12, err_msg=key)


def dense_reference(loss, x, W, y):
    state = {k: jnp.asarray(v, jnp.float64) for k, v in loss.initial_state().items()}
    out = jax.jit(lambda x, W, y, s: loss_cases.value_and_grads(x, W, y, loss, s))(x, W, y, state)
    return out, state


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_blocked_head_equals_dense(name, x64):
    """Through the class-sharded head on 8 devices (5 classes per shard: blocks of 2, the last
    one short, and of 5), the loss, the loss state and both gradients are the dense head's."""
    loss = LOSSES[name]
    x, W, y = problem(1)
    dense, state = dense_reference(loss, x, W, y)
    if loss.probability_floor:  # sample 0 is past the floor: capped (its gradient is not)
        logits = np.asarray(dense["logits"][0])
        assert np.logaddexp.reduce(logits) - logits[y[0]] > 69.0776
    for block in (2, 5):
        assert_same(loss_cases.reference_step(loss, 8, block_size=block)(x, W, y, state), dense)


@pytest.mark.parametrize("name", ["cosface", "curricularface"])
def test_running_max_equals_dense(name, x64):
    """The running-max log-sum-exp (the float32 path of losses whose logits exceed the fixed
    shift's range), forced in float64 on one device, blocks of 4 of 37: the dense loss,
    state and gradients (filtered non-targets; CurricularFace's re-weighted ones)."""
    loss = LOSSES[name]
    x, W, y = problem(2)
    state = {k: jnp.asarray(v, jnp.float64) for k, v in loss.initial_state().items()}

    def grads(fn):
        def total(x, W):
            value, _, new_state = fn(x, W, y, loss, state)
            return value, new_state

        (value, new_state), (gx, gw) = jax.jit(jax.value_and_grad(total, (0, 1), has_aux=True))(
            x, W
        )
        return {"loss": value, "state_after": new_state, "grad_embeddings": gx, "grad_weight": gw}

    online = grads(lambda *a: blocked.blocked_dense_loss(*a, block=4, online=True))
    assert_same(online, grads(losses.dense_loss))


def test_curricularface_float32_takes_the_running_max_over_shards():
    """CurricularFace's logits reach 2s = 128: in float32 the fixed shift has no room, so the
    blocks keep a running max, combined over the 8 shards with pmax; it matches the dense
    float32 head to float32 rounding."""
    loss = LOSSES["curricularface"]
    assert losses.base._lowest_shift(loss, jnp.float32) is None
    x, W, y = (a.astype(np.float32) if a.dtype.kind == "f" else a for a in problem(3))
    dense = loss_cases.reference_step(loss, 8)(x, W, y, loss.initial_state())
    got = loss_cases.reference_step(loss, 8, block_size=2)(x, W, y, loss.initial_state())
    for key in ("loss", "grad_embeddings", "grad_weight"):
        want = np.asarray(dense[key])
        np.testing.assert_allclose(
            got[key], want, rtol=0, atol=2e-5 * np.abs(want).max(), err_msg=key
        )
    np.testing.assert_allclose(got["state_after"]["t"], dense["state_after"]["t"], rtol=1e-6)


def test_partial_fc_blocked_equals_dense(x64):
    """Partial FC (r = 0.25 of 203 classes over 8 devices, 16 of 26 rows per shard, blocks of
    3): the same key samples the same rows, and the loss, state and gradients on them are the
    dense head's, with the dense centre gradient (AdaFace) and with the sampled rows' alone
    (CurricularFace)."""
    loss = LOSSES["adaface"]
    classes, rate, devices = 203, 0.25, 8
    x, W, y = problem(4, batch=16, classes=classes)
    mesh = make_mesh(devices)
    Wp = jnp.pad(W, ((0, padded_size(classes, devices) - classes), (0, 0)))
    mask, key, state = jnp.ones(16, bool), jax.random.key(5), loss.initial_state()

    def sharded(block_size):
        fn = head.sharded_margin_loss(loss, mesh, classes, sample_rate=rate, block_size=block_size)

        def total(x, w):
            out = fn(x, w, jnp.asarray(y), mask, state, key)
            return out.loss, out

        (value, out), grads = jax.jit(jax.value_and_grad(total, (0, 1), has_aux=True))(x, Wp)
        return {
            "loss": value,
            "state_after": out.state,
            "grad_embeddings": grads[0],
            "grad_weight": grads[1],
            "sampled": out.sampled,
        }

    dense, got = sharded(None), sharded(3)
    np.testing.assert_array_equal(got["sampled"], dense["sampled"])
    assert_same(got, dense)

    loss, state = LOSSES["curricularface"], LOSSES["curricularface"].initial_state()
    index = jax.jit(head.partial_fc_sampler(mesh, classes, rate))(jnp.asarray(y), mask, key)
    rows = jax.jit(head.take_rows(mesh))(Wp, index)

    def rows_step(block_size):
        fn = head.sampled_rows_loss(loss, mesh, classes, block_size)

        def total(x, rows):
            out = fn(x, rows, index, jnp.asarray(y), mask, state)
            return out.loss, out

        (value, out), grads = jax.jit(jax.value_and_grad(total, (0, 1), has_aux=True))(x, rows)
        return {
            "loss": value,
            "state_after": out.state,
            "grad_embeddings": grads[0],
            "grad_weight": grads[1],
        }

    assert_same(rows_step(3), rows_step(None))


@pytest.mark.parametrize("case_name", ["arcface_theta_plus_m_gt_pi", "curricularface_3steps_t_ema"])
def test_reference_cases_through_blocked_head(case_name, x64):
    """Two official reference cases (an arcface_torch one with capped rows; CurricularFace's
    t over three steps) through the blocked head on 8 devices (``refcheck --mesh 8 --block
    2``); the others run in ``python -m magjax.refcheck ... --block N``."""
    import json

    cases = [
        case
        for path in ("loss_refs.json", "curricularface_refs.json")
        for case in json.loads((FIXTURES / path).read_text())["cases"]
    ]
    case = next(c for c in cases if c["name"] == case_name)
    passed, detail = loss_cases.check_case(case, "float64", 8, block_size=2)
    assert passed, detail


def head_memory(block_size, classes, batch=256, dim=64, devices=8):
    """Temporary bytes per device of the sharded head's loss and gradients, compiled for the 8
    fake CPU devices on shapes alone."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = make_mesh(devices)
    loss = LOSSES["arcface"]
    fn = head.sharded_margin_loss(loss, mesh, classes, block_size=block_size)

    def grads(x, w, y, mask):
        return jax.grad(lambda x, w: fn(x, w, y, mask, {}, jax.random.key(0)).loss, (0, 1))(x, w)

    rows = NamedSharding(mesh, P(DATA_AXIS))
    shapes = (
        jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=rows),
        jax.ShapeDtypeStruct(
            (padded_size(classes, devices), dim),
            jnp.float32,
            sharding=NamedSharding(mesh, P(DATA_AXIS, None)),
        ),
        jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows),
        jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=rows),
    )
    return jax.jit(grads).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def test_blocked_head_temporaries_do_not_grow_with_batch_times_classes():
    """The dense head's temporaries hold at least one [C_local, B] float32 array; the blocked
    head's grow only by the centre gradient's [C_local, d] when the classes grow eightfold."""
    small, large = 40_000, 320_000
    per_shard_logits = large // 8 * 256 * 4
    assert head_memory(None, large) >= per_shard_logits
    blocked_small, blocked_large = head_memory(1024, small), head_memory(1024, large)
    assert blocked_large < per_shard_logits / 4
    # Beyond [C_local, d] float32 buffers, nothing that scales with the classes.
    growth = blocked_large - blocked_small
    assert growth <= 3 * (large - small) // 8 * 64 * 4


def test_config_block_size_rule():
    config = recipes.base_config()
    assert config.head.block_size is None
    for value in (None, 0, 1, 4096):
        config.head.block_size = value
        assert not [p for p in config_check.problems(config) if "block_size" in p]
    config.head.block_size = -1
    assert [p for p in config_check.problems(config) if "head.block_size" in p]


def test_bench_reads_the_bytes_a_refused_compile_asked_for():
    """`bench head --topology` reports a head too large for the chip as ``fits: false`` with
    the bytes of XLA's RESOURCE_EXHAUSTED message (here the dense head at 20 M classes on
    v5p:2x2x1), and other errors stay errors."""
    from magjax.bench.compile import exhausted_bytes

    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
        "HLO temporaries (171.69G) exceeds available HBM (95.74G)."
    )
    assert exhausted_bytes(RuntimeError(message)) == int(171.69 * 2**30)
    assert exhausted_bytes(RuntimeError("INTERNAL: (1.5G)")) is None
    assert (
        exhausted_bytes(
            RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123456 bytes.")
        )
        == 123456
    )


def test_margin_head_module_with_block_size(x64):
    """The head object with ``block_size`` (blocks of 3 of a shard's 4 rows on 8 devices), and
    unset on a device too small for the dense logits (the rule then blocks): the loss, the
    updated AdaFace state and the gradients of the dense head (``block_size`` 0)."""
    mesh = make_mesh(8)
    x, _, y = problem(5, batch=16, classes=30)
    results = []
    # The dense head's two [4, 16] float64 arrays take 1,024 bytes: more than half of 1,000.
    for block_size, memory_bytes in ((0, None), (3, None), (None, 1000)):
        margin_head = head.ClassShardedHead(
            LOSSES["adaface"],
            mesh,
            num_classes=30,
            embedding_dim=16,
            weight_init="unit",
            block_size=block_size,
            memory_bytes=memory_bytes,
        )
        params, margin_state = jax.jit(margin_head.init)(jax.random.key(0))

        def total(params, x, margin_state=margin_state, margin_head=margin_head):
            out = margin_head.loss(params, margin_state, x, jnp.asarray(y), jax.random.key(0))
            return out.loss, out.state

        params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        value_and_grad = jax.value_and_grad(total, (0, 1), has_aux=True)
        # Only the blocked head loops over the classes.
        jaxpr = str(jax.make_jaxpr(value_and_grad)(params, jnp.asarray(x)))
        looped = "while[" in jaxpr or "scan[" in jaxpr
        assert looped == (block_size != 0)
        (value, state), grads = jax.jit(value_and_grad)(params, jnp.asarray(x))
        results.append(
            {
                "loss": value,
                "state_after": state,
                "grad_embeddings": grads[1],
                "grad_weight": grads[0]["weight"],
            }
        )
    assert_same(results[1], results[0])
    assert_same(results[2], results[0])


GIB = 2**30


def test_block_rule_is_dense_until_the_logits_take_half_the_memory():
    """``head.block_size`` unset: the dense head while its two [C_local, B] arrays take at most
    half a device's memory, else the largest power of two in [256, 8192] whose [block, B]
    array takes at most 1/64 of it (at most the shard's rows); a set value is taken as it is."""
    rule = head.class_block_size
    assert rule(4096, 10**6, 4096, 4, GIB) == 4096 and rule(0, 10**9, 4096, 4, GIB) is None
    assert rule(None, 10**9, 4096, 4, None) is None  # memory unknown: dense
    # 2 x 65,536 x 4,096 x 4 bytes = 2 GiB: dense on a 4 GiB device, blocked on a 4 GiB - 1.
    assert rule(None, 65_536, 4096, 4, 4 * GIB) is None
    block = rule(None, 65_536, 4096, 4, 4 * GIB - 1)
    assert block == 2048  # 2,048 x 4,096 x 4 = 32 MiB <= 64 MiB; 4,096 would be 64 MiB
    # BENCHMARKS.md's capacity rows: v5p-64 (95 GiB, 8,192 images) and v5e-256 (16 GiB,
    # 32,768 images) at 800 M and 60 M classes.
    assert rule(None, 800_000_000 // 64, 8192, 4, 95 * GIB) == 8192
    assert rule(None, 60_000_000 // 256, 32_768, 4, 16 * GIB) == 2048
    assert rule(None, 300, 10**6, 4, GIB) == 256 and rule(None, 200, 10**6, 4, GIB) == 200


def test_head_reports_what_it_picked():
    """``block_for`` and the training log's line for a head left to its rule; a CPU device's
    memory is the host's over the process's CPU devices."""
    import os

    mesh = make_mesh(8)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert head.device_memory_bytes(mesh) == host // jax.local_device_count("cpu")
    kwargs = dict(num_classes=8 * 65_536, embedding_dim=16)
    roomy = head.ClassShardedHead(LOSSES["arcface"], mesh, memory_bytes=4 * GIB, **kwargs)
    assert roomy.block_for(4096) is None
    assert roomy.describe(4096) == (
        "margin head: dense, 65,536 classes per shard x 4096 samples (2,048 MiB of logits and "
        "their gradient of a device's 4.0 GiB)"
    )
    tight = head.ClassShardedHead(LOSSES["arcface"], mesh, memory_bytes=2 * GIB, **kwargs)
    assert tight.block_for(4096) == 2048  # 2,048 x 4,096 x 4 bytes: 1/64 of 2 GiB
    assert tight.describe(4096).startswith("margin head: 2,048 classes at a time of 65,536 ")
    # Partial FC: the rule counts the sampled rows.
    sampled = head.ClassShardedHead(
        LOSSES["arcface"], mesh, memory_bytes=2 * GIB, sample_rate=0.25, **kwargs
    )
    assert sampled.block_for(4096) is None


def test_train_components_pass_head_block_size(monkeypatch):
    """``head.block_size`` reaches the train step's head (ClassShardedHead) and, for
    Partial FC with ``freeze_unsampled``, its sampled-rows loss (checked where it is built:
    the step is not compiled here; the losses' equality is tested above)."""
    from magjax import parallel, train_step

    built = []
    original = head.sampled_rows_loss
    monkeypatch.setattr(
        head,
        "sampled_rows_loss",
        lambda *args, **kwargs: built.append(args[3]) or original(*args, **kwargs),
    )
    config = recipes.get_config("arcface", "tiny,pfc0.25")
    config.head.update(freeze_unsampled=True, block_size=5)
    components = train_step.build_components(
        config, parallel.make_mesh(8), 512, steps_per_epoch=10, total_steps=40
    )
    assert components.head.block_size == 5
    train_step.make_train_step(components, jax.random.key(0))
    assert built == [5]
    # Unset, the rule reads the memory build_components is given (bench compile: a chip's).
    config.head.block_size = None
    components = train_step.build_components(
        config, parallel.make_mesh(8), 512, 10, 40, memory_bytes=1000
    )
    assert components.head.memory_bytes == 1000
    # Partial FC's budget (every positive of 1,024 samples) is the shard's 64 rows.
    assert components.head.block_for(config.global_batch) == 64
