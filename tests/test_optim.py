"""Optimizer pieces against float64 NumPy computations of the PyTorch formulas they reproduce,
and AdamW with gradient accumulation against PyTorch driven as arcface_torch's train_v2.py."""

import json

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
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-15, atol=0), clipped, expected
    )
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

    return ml_collections.ConfigDict(
        dict(
            schedule="poly",
            lr=lr,
            warmup_epochs=warmup_epochs,
            warmup_style=warmup_style,
            milestones=(),
        )
    )


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
    np.testing.assert_allclose(
        values, _polynomial_lr_warmup(0.4, 200, 1000, steps), rtol=1e-12, atol=1e-15
    )
    plain = optim.learning_rate_schedule(_poly_config("plain"), 100, 1000)
    plain_values = np.array([plain(jnp.asarray(k)) for k in steps])
    assert plain_values[0] == 0.0
    np.testing.assert_allclose(plain_values[1:], values[1:], rtol=1e-12, atol=1e-15)
    # Without warm-up both styles are the decay alone, from the base rate.
    for style in optim.WARMUP_STYLES:
        no_warmup = optim.learning_rate_schedule(_poly_config(style, 0.0), 100, 1000)
        np.testing.assert_allclose(
            [no_warmup(jnp.asarray(k)) for k in steps],
            _polynomial_lr_warmup(0.4, 0, 1000, steps),
            atol=1e-15,
        )


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
    ties = np.array(
        [1 + 2**-11, 1 + 3 * 2**-11, -(2 + 2**-10), 65520.0, 2**-25, 3 * 2**-25], np.float32
    )
    return np.concatenate([values, ties, [0.0, -0.0, 65504.0, 70000.0]]).astype(np.float32)


@pytest.mark.parametrize("dtype, torch_dtype", [("float16", "half"), ("bfloat16", "bfloat16")])
def test_rounding_equals_torch_casts(dtype, torch_dtype):
    import torch

    values = _values_across_float16_range()
    expected = getattr(torch.from_numpy(values), torch_dtype)().float().numpy()
    tx = optim.round_gradients(dtype)
    grads = {"w": jnp.asarray(values)}
    rounded, _ = jax.jit(tx.update)(grads, tx.init(grads))
    np.testing.assert_array_equal(
        np.asarray(rounded["w"]).view(np.uint32), expected.view(np.uint32)
    )
    assert not np.array_equal(np.asarray(rounded["w"]), values)  # it did round
    if dtype == "float16":
        assert np.isinf(expected[-1]) and expected[-2] == 65504.0


def test_make_optimizer_rounds_the_backbone_gradients_only(x64):
    import ml_collections
    import optax

    config = ml_collections.ConfigDict(
        dict(
            optimizer="sgd",
            grad_clip_norm=None,
            grad_clip_eps=1e-6,
            grad_allreduce_dtype="float16",
            weight_decay=0.0,
            momentum=0.0,
            accumulate_steps=1,
        )
    )
    params = {"backbone": {"w": jnp.zeros(3)}, "head": {"w": jnp.zeros(3)}}
    mask = jax.tree.map(lambda _: True, params)
    tx = optim.make_optimizer(config, optax.constant_schedule(1.0), mask)
    g = jnp.asarray([0.1, 1e-3, 1 / 3])
    updates, _ = tx.update({"backbone": {"w": g}, "head": {"w": g}}, tx.init(params), params)
    np.testing.assert_array_equal(
        -updates["backbone"]["w"], g.astype(jnp.float16).astype(jnp.float64)
    )
    np.testing.assert_array_equal(-updates["head"]["w"], g)


# ----------------------------------------- AdamW and gradient accumulation against PyTorch


def _optim_config(optimizer, accumulate_steps=1, **changes):
    """The recipes' optim fields (base_config) with arcface_torch's clip at 5."""
    from magjax import recipes

    config = recipes.base_config().optim
    config.update(
        optimizer=optimizer,
        accumulate_steps=accumulate_steps,
        grad_clip_norm=5.0,
        warmup_style="arcface_torch",
        **changes,
    )
    return config


_SHAPES = {"backbone": {"conv": (3, 4), "bn_scale": (4,)}, "head": {"weight": (6, 4)}}
# arcface_torch's AdamW decays every parameter; one leaf off the mask checks the mask as well.
_DECAY = {"backbone": {"conv": True, "bn_scale": False}, "head": {"weight": True}}


def _micro_batch_loss(params, data, xp):
    """A loss whose gradient depends on the parameters (so that a micro-batch computed with
    parameters already updated would differ): sin of the backbone, a quadratic head."""
    backbone = params["backbone"]
    value = (
        xp.sin(backbone["conv"] * data["a"]).sum()
        + (backbone["bn_scale"] ** 2 * data["b"]).sum() * 3.0
        + ((params["head"]["weight"] - data["c"]) ** 2).sum()
    )
    return value * data["scale"]


def _micro_batches(count, accumulate_steps, seed=0):
    """Large and small gradients by turns of updates, so that the clip acts on some only."""
    rng = np.random.default_rng(seed)
    return [
        {
            "a": rng.standard_normal((3, 4)),
            "b": rng.standard_normal(4),
            "c": rng.standard_normal((6, 4)),
            "scale": 4.0 if k // accumulate_steps % 2 == 0 else 0.05,
        }
        for k in range(count)
    ]


def _torch_train_v2(config, params, batches, lr_at, accumulate_steps):
    """arcface_torch train_v2.py's loop, from its specification: each micro-batch's loss divided
    by gradient_acc and backpropagated (gradients accumulate), every gradient_acc-th micro-batch
    (global_step from 1) clip_grad_norm_(backbone, 5), optimizer step and zero_grad; the
    scheduler steps after every micro-batch, so micro-batch k runs at lr_at(k). Returns the
    parameters after every micro-batch."""
    import torch

    tensors = jax.tree.map(lambda p: torch.tensor(np.asarray(p), requires_grad=True), params)
    pairs = list(zip(jax.tree.leaves(tensors), jax.tree.leaves(_DECAY), strict=True))
    decayed, plain = [t for t, d in pairs if d], [t for t, d in pairs if not d]
    groups = [{"params": decayed}, {"params": plain, "weight_decay": 0.0}]
    if config.optimizer == "adamw":
        opt = torch.optim.AdamW(
            groups,
            lr=config.lr,
            betas=config.adam_betas,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
    else:
        opt = torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    history, clipped = [], []
    for global_step, data in enumerate(batches, start=1):
        for group in opt.param_groups:
            group["lr"] = lr_at(global_step - 1)
        torch_data = {
            k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in data.items()
        }
        (_micro_batch_loss(tensors, torch_data, torch) / accumulate_steps).backward()
        if global_step % accumulate_steps == 0:
            norm = torch.nn.utils.clip_grad_norm_(list(tensors["backbone"].values()), 5.0)
            clipped.append(bool(norm > 5.0))
            opt.step()
            opt.zero_grad()
        history.append(jax.tree.map(lambda t: t.detach().numpy().copy(), tensors))
    return history, clipped


@pytest.mark.parametrize("optimizer, accumulate_steps", [("adamw", 1), ("adamw", 3), ("sgd", 3)])
def test_optimizer_and_accumulation_follow_train_v2(optimizer, accumulate_steps, x64):
    """make_optimizer with the per-update schedule, micro-batch by micro-batch, equals
    torch.optim.AdamW / SGD driven as train_v2.py drives them (4 updates, the rate changing at
    every micro-batch: arcface_torch's warm-up then the linear decay, both in micro-batches)."""
    import optax

    lr, steps_per_epoch, updates = 1e-3, 3, 4
    total = updates * accumulate_steps
    config = _optim_config(
        optimizer, accumulate_steps, lr=lr, warmup_epochs=1.0, weight_decay=0.1, momentum=0.9
    )
    micro = optim.learning_rate_schedule(config, steps_per_epoch, total)
    tx = optim.make_optimizer(config, optim.per_update_schedule(micro, accumulate_steps), _DECAY)
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda shape: jnp.asarray(rng.standard_normal(shape)),
        _SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    batches = _micro_batches(total, accumulate_steps)

    def lr_at(k):
        return float(_polynomial_lr_warmup(lr, steps_per_epoch, total, [k])[0])

    expected, clipped = _torch_train_v2(config, params, batches, lr_at, accumulate_steps)
    assert True in clipped and False in clipped  # the clip acts on some updates only
    state = tx.init(params)
    update = jax.jit(lambda p, s, d: tx.update(jax.grad(_micro_batch_loss)(p, d, jnp), s, p))
    for k, data in enumerate(batches):
        updates_k, state = update(params, state, jax.tree.map(jnp.asarray, data))
        params = optax.apply_updates(params, updates_k)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14),
            params,
            expected[k],
        )
    moved = np.abs(expected[-1]["backbone"]["bn_scale"] - expected[0]["backbone"]["bn_scale"])
    assert moved.max() > 1e-4


def test_update_u_takes_the_rate_of_its_last_micro_batch(x64):
    """train_v2.py with gradient_acc 3: update u steps at micro-batch 3u + 2, after the scheduler
    has stepped 3u + 2 times. With 2 micro-batches per epoch, 1 warm-up epoch (2 micro-batches)
    and 12 micro-batches: the end of the warm-up (lr), then the decay at 5, 8 and 11."""
    lr = 0.5
    config = _poly_config("arcface_torch", warmup_epochs=1.0, lr=lr)
    micro = optim.learning_rate_schedule(config, 2, 12)
    schedule = optim.per_update_schedule(micro, 3)
    values = [float(schedule(jnp.asarray(u))) for u in range(4)]
    np.testing.assert_allclose(
        values, lr * np.array([1 - 0 / 10, 1 - 3 / 10, 1 - 6 / 10, 1 - 9 / 10]), rtol=1e-14
    )
    assert optim.per_update_schedule(micro, 1) is micro  # no accumulation: the schedule itself


def test_a_run_saved_before_the_optimizer_fields_resumes_as_sgd():
    """config.json of a run started before optim.optimizer, adam_betas and adam_eps existed: it
    trained SGD, so it resumes while they keep their defaults, and switching it to AdamW (whose
    state the checkpoint does not hold) is named as a change."""
    from magjax import config_check, recipes

    current = config_check.as_json_dict(recipes.get_config("arcface", "r50"))
    saved = json.loads(json.dumps(current))
    for field in ("optimizer", "adam_betas", "adam_eps"):
        del saved["optim"][field]
    assert config_check.changed_fields(saved, current) == []
    current["optim"]["optimizer"] = "adamw"
    assert config_check.changed_fields(saved, current) == ["optim.optimizer: 'sgd' -> 'adamw'"]


def test_freeze_unsampled_with_accumulation_is_refused():
    """Each micro-batch samples other classes; keep_unsampled_rows, which keeps the rows the step
    did not sample, would drop the rows earlier micro-batches sampled from the update."""
    from magjax import config_check, recipes

    config = recipes.get_config("arcface", "tiny")
    config.head.update(freeze_unsampled=True, sample_rate=0.5)
    assert config_check.problems(config) == []
    config.optim.accumulate_steps = 2
    (problem,) = config_check.problems(config)
    assert problem.startswith(
        "config.head.freeze_unsampled cannot be combined with config.optim.accumulate_steps > 1"
    )
    config.head.sample_rate = 1.0  # no Partial FC: nothing is frozen
    assert config_check.problems(config) == []
