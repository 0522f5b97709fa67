"""The backbone gradient all-reduced explicitly in ``optim.grad_allreduce_dtype``
(``models.per_device_forward``, ``parallel.reduce_gradient_in``): the same values as the jit
path in float32, each device's gradient rounded before the sum otherwise, wired into the train
step, and a bfloat16 all-reduce in the program compiled for TPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_batchnorm import _SmallNet

from magjax import models, parallel, recipes, train_step

DEVICES = 8


def _setup(batch=32):
    net = _SmallNet(dropout=0.3)
    images = jax.random.normal(jax.random.key(1), (batch, 6, 6, 3)) * 2.0 + 0.5
    variables = net.init(jax.random.key(0), images[:1], train=False)
    targets = jax.random.normal(jax.random.key(3), (batch, 5))
    return net, variables, images, targets


def _loss(embeddings, targets):
    # A sum of per-example terms: each device's gradient is its examples' share alone.
    return jnp.sum(jnp.tanh(embeddings) * targets) / embeddings.shape[0]


def _jit_path(net, variables, images, targets, key):
    def loss(params):
        embeddings, updates = models.apply_train(
            net, {**variables, "params": params}, images, dropout_key=key, groups=DEVICES
        )
        return _loss(embeddings, targets), (embeddings, updates)

    return jax.grad(loss, has_aux=True)(variables["params"])


def _explicit_path(net, variables, images, targets, key, mesh, dtype):
    def loss(params):
        embeddings, updates = models.per_device_forward(
            net,
            mesh,
            {**variables, "params": params},
            images,
            dropout_key=key,
            gradient_dtype=dtype,
        )
        return _loss(embeddings, targets), (embeddings, updates)

    return jax.grad(loss, has_aux=True)(variables["params"])


def _relative(a, b):
    return jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y))), a, b)


def test_float32_reduction_equals_the_jit_path():
    """Embeddings (dropout included), running statistics and gradients as the vmap-per-device
    forward under plain jit, to float32 summation order."""
    net, variables, images, targets = _setup()
    mesh, key = parallel.make_mesh(DEVICES), jax.random.key(7)
    shardings = dict(
        in_shardings=(
            parallel.replicated(mesh),
            parallel.batch_sharding(mesh),
            parallel.batch_sharding(mesh),
        )
    )
    grads, (embeddings, updates) = jax.jit(
        lambda v, x, t: _explicit_path(net, v, x, t, key, mesh, jnp.float32), **shardings
    )(variables, images, targets)
    ref_grads, (ref_embeddings, ref_updates) = jax.jit(
        lambda v, x, t: _jit_path(net, v, x, t, key), **shardings
    )(variables, images, targets)
    np.testing.assert_allclose(embeddings, ref_embeddings, rtol=1e-5, atol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), updates, ref_updates
    )
    # fc's bias is followed by BatchNorm: its gradient is rounding noise around 0.
    del grads["fc"]["bias"], ref_grads["fc"]["bias"]
    assert max(jax.tree.leaves(_relative(grads, ref_grads))) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_each_device_gradient_is_rounded_before_the_sum(dtype):
    """The gradient is the sum over devices of each device's own gradient rounded to ``dtype``
    (computed here by 8 independent single-device passes), summed in ``dtype``."""
    net, variables, images, targets = _setup()
    mesh, key = parallel.make_mesh(DEVICES), jax.random.key(7)
    grads, _ = jax.jit(
        lambda v, x, t: _explicit_path(net, v, x, t, key, mesh, dtype),
        in_shardings=(
            parallel.replicated(mesh),
            parallel.batch_sharding(mesh),
            parallel.batch_sharding(mesh),
        ),
    )(variables, images, targets)
    keys = jax.random.split(key, DEVICES)
    expected = None
    for device, (x, t) in enumerate(
        zip(
            np.split(np.asarray(images), DEVICES),
            np.split(np.asarray(targets), DEVICES),
            strict=True,
        )
    ):

        def share(params, x=x, t=t, device=device):
            embeddings, _ = models.apply_train(
                net, {**variables, "params": params}, x, dropout_key=keys[device]
            )
            return _loss(embeddings, t) * len(x) / len(images)

        rounded = jax.tree.map(
            lambda g: np.asarray(g.astype(dtype), np.float64),
            jax.jit(jax.grad(share))(variables["params"]),
        )
        expected = rounded if expected is None else jax.tree.map(np.add, expected, rounded)
    exact, _ = jax.jit(lambda v, x, t: _jit_path(net, v, x, t, key))(variables, images, targets)
    for tree in (grads, expected, exact):
        del tree["fc"]["bias"]  # followed by BatchNorm: rounding noise around 0
    in_dtype = jax.tree.map(lambda g: np.asarray(g.astype(dtype), np.float32), grads)
    jax.tree.map(np.testing.assert_array_equal, grads, in_dtype)  # summed in dtype
    # Within one rounding of the sum per device (a sum in dtype rounds at every addition).
    assert max(jax.tree.leaves(_relative(grads, expected))) <= DEVICES * jnp.finfo(dtype).eps
    if dtype == jnp.bfloat16:
        # XLA:CPU adds the bfloat16 shares in float32 and rounds once: exactly the rounded sum
        # of the rounded shares, which the rounded float32 gradient is not.
        jax.tree.map(
            lambda g, e: np.testing.assert_array_equal(
                g, np.asarray(jnp.asarray(e, jnp.float32).astype(dtype), np.float32)
            ),
            grads,
            expected,
        )
        exact_rounded = jax.tree.map(lambda g: np.asarray(g.astype(dtype), np.float32), exact)
        mismatched = sum(
            int(np.sum(g != e))
            for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(exact_rounded), strict=True)
        )
        assert mismatched > 0.2 * sum(g.size for g in jax.tree.leaves(grads))


def _psum_dtypes(jaxpr_text: str) -> set[str]:
    """dtypes of the values psum'd in a printed jaxpr (``a:bf16[3] = psum_invariant[...] b``)."""
    return {
        dtype
        for line in jaxpr_text.splitlines()
        if re.search(r"= psum\w*\[", line)
        for dtype in re.findall(r":(\w+)\[", line.split("=")[0])
    }


@pytest.mark.parametrize(
    ("batchnorm_stats", "dtype", "expected"),
    [
        ("per_device", "bfloat16", {"bf16"}),
        ("per_device", "float16", {"f16"}),
        ("per_device", "float32", set()),  # the partitioner's own reduction
        ("global", "bfloat16", set()),  # rounding only (optim.round_gradients)
    ],
)
def test_train_step_reduces_in_the_configured_dtype(batchnorm_stats, dtype, expected):
    config = recipes.get_config("arcface", "tiny")
    config.model.batchnorm_stats = batchnorm_stats
    config.optim.grad_allreduce_dtype = dtype
    config.global_batch = 16
    mesh = parallel.make_mesh(DEVICES)
    components = train_step.build_components(config, mesh, 64, steps_per_epoch=10, total_steps=10)
    step = train_step.make_train_step(components, jax.random.key(0))
    text = str(
        jax.make_jaxpr(step)(
            train_step.abstract_state(components), train_step.abstract_batch(mesh, 16)
        )
    )
    assert _psum_dtypes(text) - {"f32", "i32", "bool"} == expected


def test_compiled_for_tpu_the_all_reduce_is_bfloat16():
    """v5e:2x2 (libtpu, compiled on this host): one all-reduce, in bfloat16, of exactly the
    parameters' elements."""
    from magjax.bench import compile as compile_bench

    mesh = parallel.make_mesh(devices=compile_bench.topology_devices("v5e:2x2"))
    net, variables, images, targets = _setup()
    replicated = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=parallel.replicated(mesh)),
        variables,
    )
    sharded = [
        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=parallel.batch_sharding(mesh))
        for a in (images, targets)
    ]
    key = jax.random.key(7)
    compiled = (
        jax.jit(lambda v, x, t: _explicit_path(net, v, x, t, key, mesh, jnp.bfloat16)[0])
        .lower(replicated, *sharded)
        .compile()
    )
    reduced = re.findall(r"= (.*?) all-reduce(?:-start)?\(", compiled.as_text())
    assert len(reduced) == 1
    operands = re.findall(r"(\w+)\[([\d,]*)\]", reduced[0])
    assert {dtype for dtype, _ in operands} == {"bf16"}
    elements = sum(int(np.prod([int(d) for d in dims.split(",") if d])) for _, dims in operands)
    assert elements == sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
