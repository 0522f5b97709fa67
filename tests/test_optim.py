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
