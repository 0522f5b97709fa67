"""The class-sharded head on 8 fake devices against the dense single-device loss, and Partial FC."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import numpy_losses as ref
import pytest
from conftest import FIXTURES

from magjax import head, losses
from magjax.parallel import make_mesh, padded_size
from magjax.refcheck import loss_cases

LOSS_REFS = json.loads((FIXTURES / "loss_refs.json").read_text())
CURRICULARFACE_REFS = json.loads((FIXTURES / "curricularface_refs.json").read_text())

LOSSES = {
    "arcface": losses.MarginLoss.create("arcface"),
    "arcface_paper": losses.MarginLoss.create("arcface", variant="paper", probability_floor=None),
    "cosface_filtered": losses.MarginLoss.create("cosface", interclass_filtering_threshold=0.1),
    "combined_paper": losses.MarginLoss.create("combined", m1=1.2, m2=0.3, m3=0.1, variant="paper"),
    "magface": losses.MarginLoss.create("magface"),
    "magface_hard": losses.MarginLoss.create("magface", easy_margin=False),
    "adaface": losses.MarginLoss.create("adaface", t_alpha=0.5),
    "curricularface": losses.MarginLoss.create("curricularface", t_alpha=0.5),
}


def random_problem(seed, batch, classes, dim=16):
    rng = np.random.default_rng(seed)
    W = rng.normal(0, 0.05, (classes, dim))
    y = rng.integers(0, classes, batch)
    x = rng.normal(size=(batch, dim)) * rng.uniform(5, 120, (batch, 1))
    x[: batch // 2] += 3 * W[y[: batch // 2]] / 0.05  # some rows near their centre
    return x, W, y


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("batch,classes", [(16, 40), (13, 37), (5, 3)])
def test_sharded_equals_dense(name, batch, classes, x64):
    """Values, gradients and AdaFace state, 8 devices vs one, with uneven batch and classes."""
    loss = LOSSES[name]
    x, W, y = random_problem(batch * classes, batch, classes)
    state = {k: jnp.asarray(v, jnp.float64) for k, v in loss.initial_state().items()}
    dense = jax.jit(lambda x, W, y, s: loss_cases.value_and_grads(x, W, y, loss, s))(x, W, y, state)
    sharded = loss_cases.reference_step(loss, 8)(x, W, y, state)
    for key in ("loss", "logits", "grad_embeddings", "grad_weight"):
        expected = np.asarray(dense[key])
        scale = max(1.0, np.abs(expected).max())
        np.testing.assert_allclose(sharded[key], expected, rtol=0, atol=1e-9 * scale, err_msg=key)
    for key in state:
        np.testing.assert_allclose(
            sharded["state_after"][key], dense["state_after"][key], rtol=1e-12
        )


@pytest.mark.parametrize(
    "case", LOSS_REFS["cases"] + CURRICULARFACE_REFS["cases"], ids=lambda c: c["name"]
)
def test_reference_cases_through_sharded_head(case, x64):
    passed, detail = loss_cases.check_case(case, "float64", mesh_devices=8)
    assert passed, detail


def pfc_step(loss, x, W, y, sample_rate, key, devices=8):
    """Runs the sharded head with Partial FC; returns loss, metrics and gradients."""
    mesh = make_mesh(devices)
    classes = W.shape[0]
    Wp = jnp.pad(W, ((0, padded_size(classes, devices) - classes), (0, 0)))
    fn = head.sharded_margin_loss(loss, mesh, classes, sample_rate=sample_rate, return_logits=True)
    mask = jnp.ones(len(y), bool)

    def total(x, w):
        out = fn(x, w, jnp.asarray(y), mask, loss.initial_state(), key)
        return out.loss, {**out.metrics, "sampled": out.sampled}

    (value, metrics), (gx, gw) = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))(
        x, Wp
    )
    # The zero rows padding the classes get an exactly zero (not NaN) gradient.
    np.testing.assert_array_equal(gw[classes:], 0.0)
    return value, jax.tree.map(np.asarray, metrics), np.asarray(gx), np.asarray(gw)[:classes]


@pytest.mark.parametrize("name", ["arcface", "magface", "adaface", "curricularface"])
def test_partial_fc_semantics(name, x64):
    loss = LOSSES[name]
    classes, batch, rate = 203, 16, 0.25
    x, W, y = random_problem(7, batch, classes)
    key = jax.random.key(3)
    value, metrics, gx, gw = pfc_step(loss, x, W, y, rate, key)
    sampled = metrics["sampled"][:classes]
    per_shard = padded_size(classes, 8) // 8
    budget = head.partial_fc_budget(rate, per_shard, batch)
    # Every positive is kept; each shard keeps exactly its budget; padding is never chosen
    # while real classes remain.
    assert sampled[y].all()
    assert (metrics["sampled"].reshape(8, per_shard).sum(1) == budget).all()
    assert not metrics["sampled"][classes:].any() or budget > classes - 7 * per_shard
    # Unsampled centres get exactly zero gradient; sampled ones do not.
    assert (gw[~sampled] == 0).all() and (np.abs(gw[sampled]).sum(1) > 0).all()
    # The loss equals the dense loss over the sampled centres (labels remapped into them).
    kept = np.flatnonzero(sampled)
    remap = np.searchsorted(kept, y)
    dense = loss_cases.value_and_grads(x, W[kept], remap, loss, loss.initial_state())
    np.testing.assert_allclose(value, dense["loss"], rtol=1e-12)
    np.testing.assert_allclose(gx, dense["grad_embeddings"], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(gw[kept], dense["grad_weight"], rtol=1e-9, atol=1e-15)
    # Reproducible for a key, different for another.
    again = pfc_step(loss, x, W, y, rate, key)[1]["sampled"]
    other = pfc_step(loss, x, W, y, rate, jax.random.key(4))[1]["sampled"]
    np.testing.assert_array_equal(again, metrics["sampled"])
    assert (other != metrics["sampled"]).any()


def test_partial_fc_rate_one_is_the_full_head(x64):
    """Rate 1.0 keeps every class: the sharded head's loss and gradients are those of the dense
    arcface_torch head over all 50 classes, computed independently in NumPy."""
    loss = LOSSES["arcface"]  # s 64, m 0.5, arcface_torch's straight-through margin
    x, W, y = random_problem(8, 16, 50)
    value, metrics, gx, gw = pfc_step(loss, x, W, y, 1.0, jax.random.key(0))
    assert metrics["sampled"][:50].all()
    np.testing.assert_allclose(
        value, ref.arcface(x, W, y, 64.0, 0.5, "insightface", 1e-30), rtol=1e-12
    )
    dense_gx, dense_gw = ref.insightface_grads(x, W, y, 64.0, lambda c: np.cos(np.arccos(c) + 0.5))
    np.testing.assert_allclose(gx, dense_gx, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gw, dense_gw, rtol=1e-9, atol=1e-12)


def test_margin_head_module_updates_adaface_state(x64):
    """The head object: W padded by rows, EMA state initialised, and updated by its loss."""
    mesh = make_mesh(8)
    loss = LOSSES["adaface"]
    margin_head = head.ClassShardedHead(
        loss, mesh, num_classes=30, embedding_dim=16, weight_init="unit"
    )
    x, _, y = random_problem(9, 16, 30)
    params, state = margin_head.init(jax.random.key(0))
    weight = params["weight"]
    assert weight.shape == (32, 16) and (weight[30:] == 0).all()
    np.testing.assert_allclose(np.linalg.norm(weight[:30], axis=1), 1.0, rtol=1e-6)
    assert float(state["batch_mean"]) == 20.0
    out = margin_head.loss(params, state, jnp.asarray(x), jnp.asarray(y), jax.random.key(0))
    norms = np.clip(np.linalg.norm(x, axis=1), 1e-3, 100)
    np.testing.assert_allclose(out.state["batch_mean"], 0.5 * norms.mean() + 0.5 * 20.0, rtol=1e-6)
    dense = losses.dense_loss(x, np.asarray(weight[:30]), y, loss)[0]
    np.testing.assert_allclose(out.loss, dense, rtol=1e-6)


@pytest.mark.parametrize("name", ["arcface", "adaface", "curricularface"])
def test_sampled_rows_loss_is_the_dense_partial_fc(name, x64):
    """Sampling first and differentiating w.r.t. the sampled rows alone gives the loss, state
    and embedding gradient of the dense Partial FC head, and its row gradients are the dense
    gradient's sampled rows (the others being exactly zero there)."""
    loss = LOSSES[name]
    classes, batch, rate, devices = 203, 16, 0.25, 8
    x, W, y = random_problem(11, batch, classes)
    mesh = make_mesh(devices)
    Wp = jnp.pad(W, ((0, padded_size(classes, devices) - classes), (0, 0)))
    mask, key, state = jnp.ones(batch, bool), jax.random.key(5), loss.initial_state()
    dense = head.sharded_margin_loss(loss, mesh, classes, sample_rate=rate)
    index = jax.jit(head.partial_fc_sampler(mesh, classes, rate))(jnp.asarray(y), mask, key)
    rows_fn = head.sampled_rows_loss(loss, mesh, classes)

    def dense_total(x, w):
        out = dense(x, w, jnp.asarray(y), mask, state, key)
        return out.loss, out

    def rows_total(x, rows):
        out = rows_fn(x, rows, index, jnp.asarray(y), mask, state)
        return out.loss, out

    (value, out), (gx, gw) = jax.jit(jax.value_and_grad(dense_total, (0, 1), has_aux=True))(x, Wp)
    rows = jax.jit(head.take_rows(mesh))(Wp, index)
    (value_rows, out_rows), (gx_rows, g_rows) = jax.jit(
        jax.value_and_grad(rows_total, (0, 1), has_aux=True)
    )(x, rows)
    np.testing.assert_array_equal(out_rows.sampled, out.sampled)
    np.testing.assert_allclose(value_rows, value, rtol=1e-13)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-13), out_rows.state, out.state
    )
    np.testing.assert_allclose(gx_rows, gx, rtol=1e-11, atol=1e-15)
    per_shard = Wp.shape[0] // devices
    global_rows = (
        np.asarray(index).reshape(devices, -1) + per_shard * np.arange(devices)[:, None]
    ).ravel()
    np.testing.assert_allclose(g_rows, np.asarray(gw)[global_rows], rtol=1e-11, atol=1e-15)
    # put_rows inverts take_rows; the other rows are untouched.
    back = jax.jit(head.put_rows(mesh))(jnp.zeros_like(Wp), index, rows)
    np.testing.assert_array_equal(np.asarray(back)[global_rows], np.asarray(Wp)[global_rows])
    assert np.count_nonzero(np.abs(np.asarray(back)).sum(1)) == len(set(global_rows.tolist()))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_top_indices_is_the_set_top_k_takes(dtype, x64):
    """Partial FC's selection by bisection equals ``sort(lax.top_k(...)[1])``, ties included
    (to the lower index), with positives forced to 2 and padding at -1 as the sampler does."""
    top_indices = jax.jit(head.top_indices, static_argnums=1)
    rng = np.random.default_rng(0)
    uniform = rng.uniform(size=500)
    uniform[rng.choice(500, 40, replace=False)] = 2.0
    uniform[-30:] = -1.0
    edge = np.resize([-0.0, 0.0, -1.5, np.inf, -np.inf, 3.0, -2.0, 1e-40], 500)
    cases = [
        uniform,
        rng.integers(-3, 4, 500) * 0.5,  # few distinct values: ties everywhere
        np.full(500, 0.25),
        edge,
    ]
    for k in (1, 7, 250, 499, 500):
        for scores in cases:
            scores = jnp.asarray(scores, dtype)
            expected = np.sort(np.asarray(jax.lax.top_k(scores, k)[1]))
            np.testing.assert_array_equal(top_indices(scores, k), expected)
