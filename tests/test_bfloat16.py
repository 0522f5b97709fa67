"""bfloat16, the compute dtype of every recipe: training follows float32's, and the head computes
its logits, softmax and loss in float32 whatever the embedding dtype."""

import jax
import jax.numpy as jnp
import numpy as np

from magjax import head, losses, parallel, recipes, train_step

CLASSES, BATCH, STEPS = 8, 16, 30


def _batches():
    """A fixed stream of learnable batches: each class a random image, plus noise."""
    rng = np.random.default_rng(0)
    templates = rng.integers(0, 256, (CLASSES, 112, 112, 3))
    for _ in range(STEPS):
        labels = rng.integers(0, CLASSES, BATCH)
        noise = rng.normal(0, 40, (BATCH, 112, 112, 3))
        images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
        yield {"image": images, "label": labels.astype(np.int32)}


def _train_losses(dtype: str) -> np.ndarray:
    config = recipes.get_config("arcface", "tiny")
    config.model.dtype = dtype
    config.model.embedding_dim = 32
    config.global_batch = BATCH
    config.optim.lr = 0.05
    mesh = parallel.make_mesh(4)
    components = train_step.build_components(
        config, mesh, CLASSES, steps_per_epoch=STEPS, total_steps=4 * STEPS
    )
    init_key, base_key = jax.random.split(jax.random.key(0))
    state = train_step.init_state(components, init_key)
    shardings = jax.tree.map(lambda a: a.sharding, state)
    step = train_step.jit_train_step(components, base_key, shardings)
    losses_seen = []
    for batch in _batches():
        state, metrics = step(state, parallel.global_batch(mesh, batch))
        losses_seen.append(float(metrics["loss"]))
    return np.array(losses_seen)


def test_bfloat16_training_follows_float32():
    f32, bf16 = _train_losses("float32"), _train_losses("bfloat16")
    assert np.all(np.isfinite(bf16))
    # Both learn: the last steps' loss is well below the first steps'.
    for run in (f32, bf16):
        assert run[-5:].mean() < 0.8 * run[:5].mean(), run
    # The same start and batches: at first the runs differ by bf16's rounding alone (8 mantissa
    # bits in the backbone), a few per cent at most.
    np.testing.assert_allclose(bf16[:3], f32[:3], rtol=0.05)
    # Later, SGD on batches of 16 amplifies any perturbation (a float32 run with another
    # reduction order would drift too), and single steps' losses near 0 differ by large
    # factors; what must hold is the learning curve: 5-step means within 10 % of the initial
    # loss (a bf16 path that breaks learning moves them by most of it).
    windows = np.abs(bf16.reshape(-1, 5).mean(1) - f32.reshape(-1, 5).mean(1))
    assert np.all(windows < 0.1 * f32[0]), (windows / f32[0], f32, bf16)


def _head_loss_and_grads(name, embeddings, weight, labels, mesh):
    loss = losses.MarginLoss.create(name)
    fn = head.sharded_margin_loss(loss, mesh, weight.shape[0])
    mask = jnp.ones(labels.shape, bool)

    def total(x, w):
        return fn(x, w, labels, mask, loss.initial_state(), jax.random.key(0))[0]

    return jax.value_and_grad(total, argnums=(0, 1))(embeddings, weight)


_jitted_head_loss_and_grads = jax.jit(_head_loss_and_grads, static_argnums=(0, 4))


def _dtypes_computed(jaxpr) -> set[tuple[str, str]]:
    """(primitive, dtype) of every value computed in ``jaxpr`` and the jaxprs inside it."""
    found = set()
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            found.add((eqn.primitive.name, str(var.aval.dtype)))
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found |= _dtypes_computed(inner)
    return found


def test_head_computes_in_float32_for_bfloat16_embeddings():
    mesh = parallel.make_mesh(4)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(16, 64)) * 20, jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(40, 64)) * 0.01, jnp.float32)
    y = jnp.asarray(rng.integers(0, 40, 16), jnp.int32)
    # MagFace uses both the cosines and the embedding norms.
    value, (gx, gw) = _jitted_head_loss_and_grads("magface", x, w, y, mesh)
    assert value.dtype == jnp.float32 and gw.dtype == jnp.float32
    assert gx.dtype == jnp.bfloat16  # the cotangent of the input, cast back at the end
    # The embeddings are widened before anything is computed: the same bf16 values given as
    # float32 give the same loss and centre gradient to float32 rounding (a bf16 product or
    # softmax would be ~1e-2 away).
    value32, (_, gw32) = _jitted_head_loss_and_grads("magface", x.astype(jnp.float32), w, y, mesh)
    np.testing.assert_allclose(value, value32, rtol=1e-6)
    np.testing.assert_allclose(gw, gw32, rtol=1e-5, atol=1e-9)
    # No operation of the forward or backward pass produces a bfloat16 value except the casts
    # and the collectives that move the embeddings and their gradient (bf16 halves their
    # traffic, as arcface_torch gathers its fp16 features).
    for name in ("arcface", "cosface", "magface", "adaface"):
        jaxpr = jax.make_jaxpr(lambda x, w, name=name: _head_loss_and_grads(name, x, w, y, mesh))
        computed = _dtypes_computed(jaxpr(x, w).jaxpr)
        in_bf16 = {primitive for primitive, dtype in computed if dtype == "bfloat16"}
        assert in_bf16 <= {
            "convert_element_type",
            "all_gather_invariant",
            "psum_invariant",
            "dynamic_slice",
            "pvary",
            "shard_map",
        }, (name, in_bf16)
