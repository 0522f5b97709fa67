"""BatchNorm as PyTorch computes it: running statistics against torch.nn.BatchNorm in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from magjax.models import layers


def _torch_bn(shape, momentum, eps):
    cls = torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d
    return cls(shape[-1], eps=eps, momentum=momentum).double().train()


def _to_torch(x):
    # NHWC -> NCHW for maps; [B, C] stays.
    return torch.from_numpy(x.transpose(0, 3, 1, 2) if x.ndim == 4 else x)


def _from_torch(y):
    y = y.detach().numpy()
    return y.transpose(0, 2, 3, 1) if y.ndim == 4 else y


@pytest.mark.parametrize("shape, momentum, eps", [
    ((6, 5, 5, 3), 0.1, 1e-5),  # BatchNorm2d, arcface_torch / AdaFace settings
    ((16, 7), 0.9, 2e-5),       # BatchNorm1d, MagFace's momentum: the running var moves most
    ((2, 4), 0.1, 1e-5),        # n = 2: the unbiased factor is 2
])
def test_running_statistics_match_torch(shape, momentum, eps, x64):
    rng = np.random.default_rng(0)
    module = layers.batch_norm(True, eps=eps, torch_momentum=momentum, dtype=jnp.float64,
                               name="bn")
    variables = module.init(jax.random.key(0), jnp.zeros(shape, jnp.float64))
    variables = jax.tree.map(lambda v: v.astype(jnp.float64), variables)
    reference = _torch_bn(shape, momentum, eps)
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, shape[-1])))
        reference.bias.copy_(torch.from_numpy(rng.normal(size=shape[-1])))
    variables["params"] = {"scale": jnp.asarray(reference.weight.detach().numpy()),
                           "bias": jnp.asarray(reference.bias.detach().numpy())}
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
    inference = layers.batch_norm(False, eps=eps, torch_momentum=momentum, dtype=jnp.float64,
                                  name="bn")
    x = rng.normal(size=shape)
    np.testing.assert_allclose(inference.apply(variables, jnp.asarray(x)),
                               _from_torch(reference.eval()(_to_torch(x))), rtol=1e-12,
                               atol=1e-12)


def test_initialisation_does_not_move_the_running_statistics():
    module = layers.batch_norm(True, eps=1e-5, torch_momentum=0.1, dtype=jnp.float32, name="bn")
    stats = module.init(jax.random.key(0), jnp.arange(12.0).reshape(4, 3))["batch_stats"]
    np.testing.assert_array_equal(stats["mean"], np.zeros(3))
    np.testing.assert_array_equal(stats["var"], np.ones(3))
