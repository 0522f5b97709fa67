"""BatchNorm as PyTorch computes it: running statistics against torch.nn.BatchNorm in float64."""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from magjax.models import layers


def _torch_bn(shape, momentum, eps):
    cls = torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d
    return cls(shape[-1], eps=eps, momentum=momentum).double().train()


def _torch_bn_with_random_affine(shape, momentum, eps, rng):
    """A float64 torch BatchNorm with a random scale and bias, and the same as flax params."""
    reference = _torch_bn(shape, momentum, eps)
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, shape[-1])))
        reference.bias.copy_(torch.from_numpy(rng.normal(size=shape[-1])))
    params = {
        "scale": jnp.asarray(reference.weight.detach().numpy()),
        "bias": jnp.asarray(reference.bias.detach().numpy()),
    }
    return reference, params


def _to_torch(x):
    # NHWC -> NCHW for maps; [B, C] stays.
    return torch.from_numpy(x.transpose(0, 3, 1, 2) if x.ndim == 4 else x)


def _from_torch(y):
    y = y.detach().numpy()
    return y.transpose(0, 2, 3, 1) if y.ndim == 4 else y


@pytest.mark.parametrize(
    "shape, momentum, eps",
    [
        ((6, 5, 5, 3), 0.1, 1e-5),  # BatchNorm2d, arcface_torch / AdaFace settings
        ((16, 7), 0.9, 2e-5),  # BatchNorm1d, MagFace's momentum: the running var moves most
        ((2, 4), 0.1, 1e-5),  # n = 2: the unbiased factor is 2
    ],
)
def test_running_statistics_match_torch(shape, momentum, eps, x64):
    rng = np.random.default_rng(0)
    module = layers.batch_norm(True, eps=eps, torch_momentum=momentum, dtype=jnp.float64, name="bn")
    variables = module.init(jax.random.key(0), jnp.zeros(shape, jnp.float64))
    variables = jax.tree.map(lambda v: v.astype(jnp.float64), variables)
    reference, variables["params"] = _torch_bn_with_random_affine(shape, momentum, eps, rng)
    for _ in range(4):
        x = rng.normal(3.0, 2.0, shape)  # mean far from 0: a one-pass variance would drift
        y, updates = module.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
        variables = {**variables, **updates}
        expected = _from_torch(reference(_to_torch(x)))
        np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    stats = variables["batch_stats"]
    np.testing.assert_allclose(stats["mean"], reference.running_mean.numpy(), rtol=1e-13)
    np.testing.assert_allclose(stats["var"], reference.running_var.numpy(), rtol=1e-13)
    # Inference normalises with those running statistics, as torch's eval mode.
    inference = layers.batch_norm(
        False, eps=eps, torch_momentum=momentum, dtype=jnp.float64, name="bn"
    )
    x = rng.normal(size=shape)
    np.testing.assert_allclose(
        inference.apply(variables, jnp.asarray(x)),
        _from_torch(reference.eval()(_to_torch(x))),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("shape", [(6, 5, 5, 3), (16, 7), (2, 4)])
def test_gradients_match_torch(shape, x64):
    """The hand-written backward against torch.nn.BatchNorm's autograd, float64: the input,
    scale and bias gradients of a random linear function of the output."""
    rng = np.random.default_rng(1)
    module = layers.batch_norm(True, eps=2e-5, torch_momentum=0.1, dtype=jnp.float64, name="bn")
    reference, params = _torch_bn_with_random_affine(shape, 0.1, 2e-5, rng)
    stats = jax.tree.map(
        lambda v: v.astype(jnp.float64),
        module.init(jax.random.key(0), jnp.zeros(shape))["batch_stats"],
    )
    x, dy = rng.normal(3.0, 2.0, shape), rng.normal(size=shape)

    def linear_in_output(params, x):
        y, _ = module.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
        return jnp.vdot(y, dy)

    dparams, dx = jax.grad(linear_in_output, argnums=(0, 1))(params, jnp.asarray(x))
    x_torch = _to_torch(x).requires_grad_()
    (reference(x_torch) * _to_torch(dy)).sum().backward()
    np.testing.assert_allclose(dx, _from_torch(x_torch.grad), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dparams["scale"], reference.weight.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(dparams["bias"], reference.bias.grad.numpy(), rtol=1e-10)


def test_gradient_through_the_batch_statistics(x64):
    """``normalize_with_batch_statistics`` also returns the batch mean and variance; their
    cotangents reach ``x`` too (autodiff of the textbook formula, float64, as reference)."""
    rng = np.random.default_rng(2)
    x, scale, bias = rng.normal(1.0, 3.0, (4, 3, 3, 5)), rng.normal(size=5), rng.normal(size=5)
    cotangents = (rng.normal(size=x.shape), rng.normal(size=5), rng.normal(size=5))

    def textbook(x, scale, bias):
        mean = x.mean((0, 1, 2))
        var = ((x - mean) ** 2).mean((0, 1, 2))
        return (x - mean) / jnp.sqrt(var + 1e-5) * scale + bias, mean, var

    outputs, vjp = jax.vjp(
        lambda x, s, b: layers.normalize_with_batch_statistics(x, s, b, 1e-5, jnp.float64),
        x,
        scale,
        bias,
    )
    expected_outputs, expected_vjp = jax.vjp(textbook, x, scale, bias)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12),
        outputs,
        expected_outputs,
    )
    for got, expected in zip(vjp(cotangents), expected_vjp(cotangents), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "dtype, affine", [(jnp.float32, True), (jnp.bfloat16, True), (jnp.float32, False)]
)
def test_same_output_as_flax_and_gradients_within_rounding(dtype, affine):
    """The forward is flax.linen.BatchNorm's op for op (bit-identical output, bfloat16 compute
    and no scale or bias included); the gradients differ from autodiff of flax's forward by
    float32 rounding only (the bfloat16 input gradient by bfloat16 rounding)."""
    shape = (8, 6, 6, 16)
    x = (jax.random.normal(jax.random.key(0), shape) * 2.0 + 3.0).astype(dtype)
    dy = jax.random.normal(jax.random.key(1), shape).astype(dtype)
    params = (
        {
            "scale": jax.random.uniform(jax.random.key(2), (16,), minval=0.5, maxval=1.5),
            "bias": jax.random.normal(jax.random.key(3), (16,)),
        }
        if affine
        else {}
    )
    stats = {"mean": jnp.zeros(16), "var": jnp.ones(16)}
    ours = layers.batch_norm(
        True, eps=1e-5, torch_momentum=0.1, dtype=dtype, name="bn", affine=affine
    )
    flax_bn = nn.BatchNorm(
        use_running_average=False,
        momentum=0.9,
        epsilon=1e-5,
        use_fast_variance=False,
        use_scale=affine,
        use_bias=affine,
        dtype=dtype,
        param_dtype=jnp.float32,
    )

    def output_and_gradients(module):
        def linear_in_output(params, x):
            y, _ = module.apply(
                {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"]
            )
            return jnp.vdot(y.astype(jnp.float32), dy.astype(jnp.float32)), y

        return jax.jit(jax.grad(linear_in_output, argnums=(0, 1), has_aux=True))(params, x)

    (dparams, dx), y = output_and_gradients(ours)
    (expected_dparams, expected_dx), expected_y = output_and_gradients(flax_bn)
    assert y.dtype == dtype and dx.dtype == dtype
    np.testing.assert_array_equal(y, expected_y)
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    assert dparams.keys() == expected_dparams.keys() == params.keys()
    for got, expected in ((dx, expected_dx), *((dparams[k], expected_dparams[k]) for k in params)):
        got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
        np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance * np.abs(expected).max())


def test_initialisation_does_not_move_the_running_statistics():
    module = layers.batch_norm(True, eps=1e-5, torch_momentum=0.1, dtype=jnp.float32, name="bn")
    stats = module.init(jax.random.key(0), jnp.arange(12.0).reshape(4, 3))["batch_stats"]
    np.testing.assert_array_equal(stats["mean"], np.zeros(3))
    np.testing.assert_array_equal(stats["var"], np.ones(3))


def _all_reduces(compiled) -> tuple[int, int]:
    """(all-reduce ops, array elements they reduce) in a compiled program."""
    results = re.findall(r"= (.*?) all-reduce(?:-start)?\(", compiled.as_text())
    elements = sum(
        math.prod(int(d) for d in dims.split(",") if d)
        for result in results
        for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", result)
    )
    return len(results), elements


class _SmallNet(nn.Module):
    """conv -> BatchNorm2d -> PReLU -> (dropout) -> Linear -> BatchNorm1d: both kinds of
    statistics, small."""

    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, *, train):
        x = layers.conv(
            4, 3, padding=1, kernel_init=nn.initializers.normal(0.5), dtype=jnp.float32, name="conv"
        )(x)
        x = layers.batch_norm(train, eps=1e-5, torch_momentum=0.1, dtype=jnp.float32, name="bn2d")(
            x
        )
        x = layers.PReLU(name="prelu")(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(layers.flatten(x))
        x = nn.Dense(5, name="fc")(x)
        return layers.batch_norm(
            train, eps=1e-5, torch_momentum=0.1, dtype=jnp.float32, name="bn1d"
        )(x)


def test_per_device_statistics_equal_independent_forward_passes():
    """``groups = 8`` on 8 devices: each device's shard is normalised on its own, as 8
    single-device forward passes; running statistics are shard 0's (DDP's rank 0)."""
    from magjax import models, parallel

    mesh = parallel.make_mesh(8)
    net = _SmallNet()
    images = jax.random.normal(jax.random.key(1), (24, 6, 6, 3)) * 2.0 + 0.5
    variables = net.init(jax.random.key(0), images[:1], train=False)
    key = jax.random.key(2)

    def compiled_forward(groups):
        forward = jax.jit(
            lambda v, x: models.apply_train(net, v, x, dropout_key=key, groups=groups),
            in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
        )
        return forward.lower(variables, images).compile()

    per_device = compiled_forward(8)
    embeddings, updates = per_device(variables, images)
    single = jax.jit(lambda x: net.apply(variables, x, train=True, mutable=["batch_stats"]))
    singles = [single(shard) for shard in np.split(np.asarray(images), 8)]
    np.testing.assert_allclose(
        embeddings, np.concatenate([e for e, _ in singles]), rtol=1e-5, atol=1e-5
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        updates["batch_stats"],
        singles[0][1]["batch_stats"],
    )
    # Global statistics are another computation (a bug merging the groups would pass as it),
    # reduced across devices; per device, nothing crosses devices but shard 0's running
    # statistics, sent to every device (one all-reduce of their size).
    global_stats = compiled_forward(1)
    assert not np.allclose(global_stats(variables, images)[0], embeddings, atol=1e-2)
    running_size = sum(leaf.size for leaf in jax.tree.leaves(variables["batch_stats"]))
    assert _all_reduces(per_device) == (1, running_size)
    # Global: mean, then variance (two passes), of each of the 2 BatchNorms.
    assert _all_reduces(global_stats)[0] >= 4
