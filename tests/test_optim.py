"""Optimizer pieces against float64 NumPy computations of the PyTorch formulas they reproduce."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magjax import optim


def _grads(scale):
    rng = np.random.default_rng(0)
    return {"a": scale * rng.standard_normal((3, 4)), "b": {"c": scale * rng.standard_normal(5)}}


def _torch_clip_numpy(grads, max_norm, eps=1e-6):
    """clip_grad_norm_'s definition: norm of the per-tensor 2-norms, factor min(1, max/(n+eps))."""
    leaves = jax.tree.leaves(grads)
    total = np.linalg.norm([np.linalg.norm(g.ravel()) for g in leaves])
    factor = min(1.0, max_norm / (total + eps))
    return jax.tree.map(lambda g: g * factor, grads)


@pytest.mark.parametrize("scale", [0.01, 3.0])  # below and above the clip norm
def test_clip_matches_torch_formula(scale, x64):
    grads = _grads(scale)
    expected = _torch_clip_numpy(grads, max_norm=5.0)
    tx = optim.clip_by_global_norm_torch(5.0)
    clipped, _ = tx.update(jax.tree.map(jnp.asarray, grads), tx.init(grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-15, atol=0), clipped,
                 expected)
    if scale == 0.01:  # unclipped: returned bit for bit
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), clipped, grads)


def test_clip_differs_from_optax_by_the_epsilon(x64):
    """optax's clip_by_global_norm (eps 0) is 1e-6/norm away from PyTorch's on a clipped update;
    ``eps=0`` reproduces it."""
    import optax

    grads = jax.tree.map(jnp.asarray, _grads(3.0))
    norm = float(optax.tree.norm(grads))
    torch_style, _ = optim.clip_by_global_norm_torch(5.0).update(grads, optax.EmptyState())
    optax_style, _ = optax.clip_by_global_norm(5.0).update(grads, optax.EmptyState())
    ratio = np.asarray(torch_style["a"]) / np.asarray(optax_style["a"])
    np.testing.assert_allclose(ratio, norm / (norm + 1e-6), rtol=1e-14)
    assert abs(ratio[0, 0] - 1.0) > 1e-9
    no_eps, _ = optim.clip_by_global_norm_torch(5.0, eps=0.0).update(grads, optax.EmptyState())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-15), no_eps, optax_style)


def _poly_config(warmup_style, warmup_epochs=2.0, lr=0.4):
    import ml_collections

    return ml_collections.ConfigDict(dict(schedule="poly", lr=lr, warmup_epochs=warmup_epochs,
                                          warmup_style=warmup_style, milestones=()))


def _polynomial_lr_warmup(lr, warmup, total, steps):
    """arcface_torch PolynomialLRWarmup (power 1) as specified: base rate at step 0, lr·k/w
    for 1 <= k <= w, then lr·(1 - (k - w)/(t - w))."""
    values = []
    for k in steps:
        if k == 0:
            values.append(lr)
        elif k <= warmup:
            values.append(lr * k / warmup)
        else:
            values.append(lr * (1.0 - (k - warmup) / (total - warmup)))
    return np.array(values)


def test_arcface_torch_warmup_starts_at_the_base_rate(x64):
    steps = np.array([0, 1, 2, 3, 100, 199, 200, 201, 600, 999, 1000])
    schedule = optim.learning_rate_schedule(_poly_config("arcface_torch"), 100, 1000)
    values = np.array([schedule(jnp.asarray(k)) for k in steps])
    np.testing.assert_allclose(values[:4], [0.4, 0.002, 0.004, 0.006], rtol=1e-12)
    np.testing.assert_allclose(values, _polynomial_lr_warmup(0.4, 200, 1000, steps), rtol=1e-12,
                               atol=1e-15)
    plain = optim.learning_rate_schedule(_poly_config("plain"), 100, 1000)
    plain_values = np.array([plain(jnp.asarray(k)) for k in steps])
    assert plain_values[0] == 0.0
    np.testing.assert_allclose(plain_values[1:], values[1:], rtol=1e-12, atol=1e-15)
    # Without warm-up both styles are the decay alone, from the base rate.
    for style in optim.WARMUP_STYLES:
        no_warmup = optim.learning_rate_schedule(_poly_config(style, 0.0), 100, 1000)
        np.testing.assert_allclose([no_warmup(jnp.asarray(k)) for k in steps],
                                   _polynomial_lr_warmup(0.4, 0, 1000, steps), atol=1e-15)


def test_unknown_warmup_style_is_a_user_error():
    from magjax.errors import UserError

    with pytest.raises(UserError, match="optim.warmup_style"):
        optim.learning_rate_schedule(_poly_config("linear"), 100, 1000)


def test_arcface_torch_recipes_use_its_warmup_and_the_others_plain():
    from magjax import recipes

    assert recipes.get_config("arcface").optim.warmup_style == "arcface_torch"
    assert recipes.get_config("cosface", "webface42m").optim.warmup_style == "arcface_torch"
    assert recipes.get_config("arcface", "demo").optim.warmup_style == "plain"


def _values_across_float16_range():
    rng = np.random.default_rng(1)
    magnitudes = 10.0 ** rng.uniform(-9, 5.2, 4000)  # subnormals to overflow (max 65504)
    values = (magnitudes * rng.choice([-1.0, 1.0], magnitudes.size)).astype(np.float32)
    # Exact ties between two float16 neighbours (1 + 2^-11 lies halfway between 1 and 1 + 2^-10).
    ties = np.array([1 + 2**-11, 1 + 3 * 2**-11, -(2 + 2**-10), 65520.0, 2**-25, 3 * 2**-25],
                    np.float32)
    return np.concatenate([values, ties, [0.0, -0.0, 65504.0, 70000.0]]).astype(np.float32)


@pytest.mark.parametrize("dtype, torch_dtype", [("float16", "half"), ("bfloat16", "bfloat16")])
def test_rounding_equals_torch_casts(dtype, torch_dtype):
    import torch

    values = _values_across_float16_range()
    expected = getattr(torch.from_numpy(values), torch_dtype)().float().numpy()
    tx = optim.round_gradients(dtype)
    grads = {"w": jnp.asarray(values)}
    rounded, _ = jax.jit(tx.update)(grads, tx.init(grads))
    np.testing.assert_array_equal(np.asarray(rounded["w"]).view(np.uint32),
                                  expected.view(np.uint32))
    assert not np.array_equal(np.asarray(rounded["w"]), values)  # it did round
    if dtype == "float16":
        assert np.isinf(expected[-1]) and expected[-2] == 65504.0


def test_make_optimizer_rounds_the_backbone_gradients_only(x64):
    import ml_collections
    import optax

    config = ml_collections.ConfigDict(dict(
        grad_clip_norm=None, grad_clip_eps=1e-6, grad_allreduce_dtype="float16",
        weight_decay=0.0, momentum=0.0, accumulate_steps=1))
    params = {"backbone": {"w": jnp.zeros(3)}, "head": {"w": jnp.zeros(3)}}
    mask = jax.tree.map(lambda _: True, params)
    tx = optim.make_optimizer(config, optax.constant_schedule(1.0), mask)
    g = jnp.asarray([0.1, 1e-3, 1 / 3])
    updates, _ = tx.update({"backbone": {"w": g}, "head": {"w": g}}, tx.init(params), params)
    np.testing.assert_array_equal(-updates["backbone"]["w"], g.astype(jnp.float16)
                                  .astype(jnp.float64))
    np.testing.assert_array_equal(-updates["head"]["w"], g)
