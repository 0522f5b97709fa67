"""Optimizer and learning-rate schedules of the official recipes, built from optax pieces.

PyTorch ``SGD(momentum=0.9, weight_decay=wd)`` adds ``wd · p`` to the gradient before the
momentum buffer; the optax equivalent is ``add_decayed_weights`` followed by ``sgd(momentum)``.
``torch.optim.AdamW(lr, betas, eps, weight_decay)`` (arcface_torch's ViT recipes) shrinks every
parameter by ``lr · wd`` besides the Adam step: ``optax.adamw``, the same formula.
arcface_torch clips the backbone gradient norm at 5 before either (not the class centres), with
``torch.nn.utils.clip_grad_norm_``'s formula (:func:`clip_by_global_norm_torch`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from magjax.errors import UserError

WARMUP_STYLES = ("arcface_torch", "plain")
OPTIMIZERS = ("sgd", "adamw")


def learning_rate_schedule(optim: Any, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """``optim.schedule``:

    * ``"poly"`` (arcface_torch ``PolynomialLRWarmup``, power 1): linear warm-up over
      ``warmup_epochs`` (``w`` updates, ``lr · k / w`` at update ``k``), then linear decay to 0
      at ``total_steps``, stepped every iteration. ``optim.warmup_style="arcface_torch"``
      reproduces that scheduler's first value: it returns the base rate at ``last_epoch == 0``,
      so the first update uses the full ``lr`` and the warm-up proper starts at the second
      (``lr, lr/w, 2 lr/w, ...``); ``"plain"`` starts at 0;
    * ``"step"`` (MagFace, AdaFace ``MultiStepLR``): ``lr`` times 0.1 at each epoch in
      ``milestones``, applied per epoch.
    """
    if optim.schedule == "poly":
        if optim.warmup_style not in WARMUP_STYLES:
            raise UserError(
                f"config.optim.warmup_style must be one of {', '.join(WARMUP_STYLES)}"
                f"; got {optim.warmup_style!r}"
            )
        warmup = int(optim.warmup_epochs * steps_per_epoch)
        decay = optax.linear_schedule(optim.lr, 0.0, max(total_steps - warmup, 1))
        plain = (
            decay
            if warmup == 0
            else optax.join_schedules(
                [optax.linear_schedule(0.0, optim.lr, warmup), decay], [warmup]
            )
        )
        first_update_at_lr = optim.warmup_style == "arcface_torch" and warmup > 0

        def poly(step):
            # optax's linear schedules divide an int32 count and return float32 even with x64
            # on; a float count gives the default float dtype (float64 under x64, where the
            # lockstep test against PyTorch needs the rate to the last bit).
            value = plain(jnp.asarray(step, float))
            return jnp.where(step == 0, optim.lr, value) if first_update_at_lr else value

        return poly
    if optim.schedule == "step":
        boundaries = {int(epoch * steps_per_epoch): 0.1 for epoch in optim.milestones}
        return optax.piecewise_constant_schedule(optim.lr, boundaries)
    raise ValueError(f"optim.schedule must be 'poly' or 'step', got {optim.schedule!r}")


def per_update_schedule(micro: optax.Schedule, accumulate_steps: int) -> optax.Schedule:
    """The learning rate of each optimizer update when ``micro`` is stepped every micro-batch.

    arcface_torch's ``train_v2.py`` with ``gradient_acc = a`` counts warm-up and total steps in
    micro-batches, steps its scheduler after every micro-batch and the optimizer after every
    ``a``-th, so update ``u`` (from 0) takes the rate of micro-batch ``u·a + a - 1``, the last of
    its window. ``a == 1`` returns ``micro`` itself.
    """
    if accumulate_steps == 1:
        return micro
    return lambda update: micro(update * accumulate_steps + accumulate_steps - 1)


def _is_batchnorm(path: tuple[str, ...], module_params: dict) -> bool:
    # Flax BatchNorm parameters are 'scale' and 'bias'; Dense/Conv have a 'kernel'.
    return "scale" in module_params and "kernel" not in module_params


def weight_decay_mask(params: Any, trainable: Any, decay_batchnorm: bool) -> Any:
    """True where weight decay applies: every trainable parameter, minus BatchNorm parameters
    when ``decay_batchnorm`` is False (AdaFace decays only non-BN backbone weights and the head)."""
    flat = traverse_util.flatten_dict(params)
    flat_trainable = traverse_util.flatten_dict(trainable)
    modules: dict[tuple, dict] = {}
    for path in flat:
        modules.setdefault(path[:-1], {})[path[-1]] = True
    mask = {}
    for path in flat:
        decays = bool(flat_trainable[path])
        if not decay_batchnorm and _is_batchnorm(path, modules[path[:-1]]):
            decays = False
        mask[path] = decays
    return traverse_util.unflatten_dict(mask)


def _part_labels(params: Any) -> Any:
    return {part: jax.tree.map(lambda _, part=part: part, params[part]) for part in params}


def clip_by_global_norm_torch(max_norm: float, eps: float = 1e-6) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_(max_norm)``: multiplies every gradient by
    ``min(1, max_norm / (total_norm + eps))``, ``total_norm`` the 2-norm of all of them.

    PyTorch adds ``eps = 1e-6`` to the norm; ``optax.clip_by_global_norm`` divides by the bare
    norm (``eps = 0`` here), which changes a clipped update by ~``1e-6 / total_norm`` relative.
    """

    def update(updates, state, params=None):
        del params
        factor = max_norm / (optax.tree.norm(updates) + eps)
        clipped = jax.tree.map(lambda g: g * factor.astype(g.dtype), updates)
        # Unclipped gradients pass through untouched (PyTorch multiplies by exactly 1.0).
        return jax.tree.map(lambda c, g: jnp.where(factor < 1.0, c, g), clipped, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


GRAD_ALLREDUCE_DTYPES = ("float32", "float16", "bfloat16")


def round_gradients(dtype: str) -> optax.GradientTransformation:
    """Rounds every gradient to ``dtype`` and back (identity for ``float32``).

    ``float16`` is what arcface_torch's DDP ``fp16_compress_hook`` does to each backbone
    gradient before clipping and the update: cast to float16 (round to nearest even, overflow to
    inf), all-reduce, cast back. With per-device BatchNorm statistics the train step reduces the
    gradients itself in this dtype (``models.per_device_forward``: each device's share rounded,
    then summed in the dtype, as the hook on several GPUs) and this rounding changes nothing; with
    global statistics (one device, or the CPU demo) it is the whole effect. Under fp16 AMP the
    hook rounds the loss-scaled gradients, which for a power-of-two scale is the same rounding
    except in float16's subnormal and overflow ranges.
    """
    if dtype not in GRAD_ALLREDUCE_DTYPES:
        raise UserError(
            f"config.optim.grad_allreduce_dtype must be one of "
            f"{', '.join(GRAD_ALLREDUCE_DTYPES)}; got {dtype!r}"
        )
    if dtype == "float32":
        return optax.identity()
    rounded = jnp.dtype(dtype)
    return optax.stateless(
        lambda updates, params: jax.tree.map(lambda g: g.astype(rounded).astype(g.dtype), updates)
    )


def make_optimizer(
    optim: Any, schedule: optax.Schedule, decay_mask: Any
) -> optax.GradientTransformation:
    """``optim.optimizer`` as the official trainers run it, after the gradient clip.

    * ``"sgd"``: ``torch.optim.SGD(momentum, weight_decay)``: ``wd · p`` added to the gradient
      (where ``decay_mask`` allows), then momentum;
    * ``"adamw"``: ``torch.optim.AdamW(betas=optim.adam_betas, eps=optim.adam_eps,
      weight_decay)``: the Adam step plus the decoupled decay ``lr · wd · p`` where
      ``decay_mask`` allows (arcface_torch passes every parameter).

    Parameters are ``{"backbone": ..., "head": ...}``; the gradient-norm clip (if set) applies to
    the backbone only, with PyTorch's formula and ``optim.grad_clip_eps`` (1e-6 as PyTorch; 0
    gives optax's ``clip_by_global_norm``), after rounding the backbone gradients to
    ``optim.grad_allreduce_dtype`` (:func:`round_gradients`). ``accumulate_steps > 1``
    averages that many micro-batch gradients per update (``optax.MultiSteps``; arcface_torch
    sums the gradients of ``loss / gradient_acc``, the same mean) and clips and updates once per
    window; ``schedule`` counts updates (:func:`per_update_schedule`).
    """
    if optim.optimizer not in OPTIMIZERS:
        raise UserError(
            f"config.optim.optimizer must be one of {', '.join(OPTIMIZERS)}; "
            f"got {optim.optimizer!r}"
        )
    clip = (
        clip_by_global_norm_torch(optim.grad_clip_norm, optim.grad_clip_eps)
        if optim.grad_clip_norm
        else optax.identity()
    )
    backbone = optax.chain(round_gradients(optim.grad_allreduce_dtype), clip)
    clipped = optax.multi_transform({"backbone": backbone, "head": optax.identity()}, _part_labels)
    if optim.optimizer == "adamw":
        b1, b2 = optim.adam_betas
        tx = optax.chain(
            clipped,
            optax.adamw(
                schedule,
                b1=b1,
                b2=b2,
                eps=optim.adam_eps,
                weight_decay=optim.weight_decay,
                mask=decay_mask,
            ),
        )
    else:
        # Three links, as before AdamW existed: checkpoints hold the state in this structure.
        tx = optax.chain(
            clipped,
            optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
            optax.sgd(schedule, momentum=optim.momentum),
        )
    if optim.accumulate_steps > 1:
        # optax accumulates in float32 unless told; the default float dtype is float32 too,
        # float64 where x64 is on (the float64 lockstep tests: PyTorch accumulates in the
        # parameters' dtype).
        tx = optax.MultiSteps(
            tx,
            every_k_schedule=optim.accumulate_steps,
            accumulator_dtype=jax.dtypes.canonicalize_dtype(jnp.float64),
        )
    return tx


def keep_unsampled_rows(new: Any, old: Any, sampled: jax.Array, row_leaf) -> Any:
    """Partial FC with ``freeze_unsampled``: class-centre rows not sampled this step keep their
    previous values in every leaf ``row_leaf(path, leaf)`` selects (the centres and their
    momentum), so neither momentum nor weight decay moves them."""

    def select(path, new_leaf, old_leaf):
        if row_leaf(path, new_leaf):
            return jnp.where(sampled[:, None], new_leaf, old_leaf)
        return new_leaf

    return jax.tree_util.tree_map_with_path(select, new, old)
