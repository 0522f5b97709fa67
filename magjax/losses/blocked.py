"""The margin loss class block by class block: the ``[C, B]`` cosines and logits never held.

:func:`magjax.losses.margin_loss` computes the class-major cosines ``[C, B]`` and keeps one
such array (the exponentials) for the backward pass: 8 bytes per class and sample of the global
batch with its gradient, which bounds the classes a chip can hold far below what its centres
take (BENCHMARKS.md, "Capacity"). Here the classes of a shard are visited in blocks of
``block`` rows (a ``lax`` loop; a last, shorter block when ``block`` does not divide them): each
block's cosines and logits are computed, reduced into a sum of exponentials ``[B]`` and
dropped. The backward pass (a hand-written VJP) recomputes each block's cosines from the
centres and the embeddings, one matrix product more than the dense head, and accumulates the
embedding gradient ``[B, d]`` and writes the centre gradient block by block into ``[C, d]``.
The compiled program's temporaries are then ``O(block · B + B · d)`` beyond the centres'
gradient, whatever the classes (the same idea as Cut Cross-Entropy and the vocabulary tiling of
MaxText and Levanter, which apply no margin).

What a margin needs is kept exact:

* the target cosines are gathered before the loop (``B`` rows of the centres), so every loss's
  :meth:`~magjax.losses.MarginLoss.margin` (ArcFace, CosFace, combined, MagFace, AdaFace: only
  the target changes) runs once on them, as in the dense head, with its own gradient;
* the non-target logits are :meth:`~magjax.losses.MarginLoss.non_target_logits` of each block,
  with the margin's per-sample context (CurricularFace's hard-example threshold and ``t``,
  arcface_torch's inter-class filtering): elementwise, so a block applies them as the dense
  head does, and its backward pass takes their gradient by ``jax.vjp`` on the block;
* the log-sum-exp shift is the dense head's (``max(target, c0)``, then ``pmax`` over shards;
  no running max), or, where the dtype has no room for that (float32 with ``s · max|logit|``
  above ~73, e.g. CurricularFace's ``2s``), a running max per sample with the usual rescaling,
  combined over shards with ``pmax``/``psum``;
* arcface_torch's probability floor (forward capped, gradient not) is applied to the
  per-sample loss exactly as :func:`magjax.losses.margin_cross_entropy` does.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from magjax.losses.base import (
    _NORM_EPS,
    MarginLoss,
    _lowest_shift,
    _non_target,
    _target_index,
    clamp,
    head_dtype,
    joined_cross_entropy,
    l2_normalize,
    safe_norm,
)


def target_cosines(
    embeddings: jax.Array, weight: jax.Array, labels: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(x_unit, target_cos)``: the unit embeddings ``[B, d]`` in the head dtype and each
    sample's target cosine ``[B]`` from the gathered centre rows ``weight[y_i]`` (0 where the
    label is outside ``[0, C)``), as :func:`magjax.losses.cosine_similarity` returns it without
    forming the ``[C, B]`` cosines. Differentiable (the centres' share is a scatter-add)."""
    dtype = head_dtype(jnp.result_type(embeddings, weight))
    x_unit = l2_normalize(embeddings.astype(dtype))
    rows, owned = _target_index(labels, weight.shape[0])
    centres = weight.astype(dtype)[rows]
    cos = (centres * x_unit).sum(axis=1) / safe_norm(centres)
    return x_unit, jnp.where(owned, cos, 0.0)


def _blocks(num_classes: int, block: int) -> tuple[int, int]:
    """``(full blocks, rows of the last short block)`` for ``num_classes`` rows."""
    block = max(1, min(block, num_classes))
    return num_classes // block, num_classes % block


def _zeros_like_both(a: jax.Array, b: jax.Array, shape_of: jax.Array) -> jax.Array:
    """Zeros shaped as ``shape_of``, varying over every mesh axis that ``a`` or ``b`` varies
    over (inside ``jax.shard_map`` a loop carry must keep the type its body returns)."""
    return jnp.zeros_like(shape_of) + jnp.zeros_like(a.ravel()[0]) + jnp.zeros_like(b.ravel()[0])


def _block_cosines(x_unit, w_block):
    """Class-major cosines ``[n, B]`` of one block of centres and the centres' norms ``[n]``
    (the dense head's formula: the raw product scaled by ``1/||W_j||``)."""
    norm = safe_norm(w_block)
    raw = jnp.einsum("cd,bd->cb", w_block, x_unit, preferred_element_type=x_unit.dtype)
    return raw * (1.0 / norm)[:, None], norm


def _block_keep(labels, class_mask, start, size):
    """The entries of a block ``[size, B]`` that enter the softmax besides the targets."""
    keep = _non_target(labels - start, None, size)
    if class_mask is not None:
        keep = keep & lax.dynamic_slice_in_dim(class_mask, start, size)[:, None]
    return keep


def _for_each_block(num_classes, block, body, carry):
    """``carry = body(start, size, carry)`` over the blocks (static ``size``): a loop over the
    full blocks, then the short last one."""
    full, rest = _blocks(num_classes, block)
    size = max(1, min(block, num_classes))
    if full:
        carry = lax.fori_loop(0, full, lambda k, c: body(k * size, size, c), carry)
    if rest:
        carry = body(full * size, rest, carry)
    return carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _blocked_sum_exp(loss, block, online, x_unit, weight, labels, class_mask, context, shift):
    """``(m, Σ_j exp(z_ji - m_i))`` over the non-target classes ``j`` of ``weight``, with
    ``z = loss.non_target_logits(cosines, context)`` computed block by block.

    ``online=False``: ``m = shift`` (given). ``online=True``: ``m`` is the running max of the
    logits, starting at ``shift``. ``m`` passes no gradient (a log-sum-exp's shift); the sum's
    gradient is formed by recomputing each block (no ``[C, B]`` residual).
    """
    return _blocked_sum_exp_forward(
        loss, block, online, x_unit, weight, labels, class_mask, context, shift
    )[0]


def _blocked_sum_exp_forward(
    loss, block, online, x_unit, weight, labels, class_mask, context, shift
):
    def body(start, size, carry):
        m, total = carry
        w_block = lax.dynamic_slice_in_dim(weight, start, size)
        logits = loss.non_target_logits(_block_cosines(x_unit, w_block)[0], context)
        logits = jnp.where(_block_keep(labels, class_mask, start, size), logits, -jnp.inf)
        if online:
            m_new = jnp.maximum(m, logits.max(axis=0))
            total = total * jnp.exp(m - m_new)
            m = m_new
        return m, total + jnp.exp(logits - m).sum(axis=0)

    zeros = _zeros_like_both(x_unit, weight, shift)
    m, total = _for_each_block(weight.shape[0], block, body, (shift + zeros, zeros))
    return (m, total), (x_unit, weight, labels, class_mask, context, m)


def _blocked_sum_exp_backward(loss, block, online, residuals, cotangents):
    x_unit, weight, labels, class_mask, context, m = residuals
    _, grad_total = cotangents  # m is a shift: used under stop_gradient

    def body(start, size, carry):
        grad_x, grad_w = carry
        w_block = lax.dynamic_slice_in_dim(weight, start, size)
        cos, norm = _block_cosines(x_unit, w_block)
        logits, logits_vjp = jax.vjp(lambda c: loss.non_target_logits(c, context), cos)
        keep = _block_keep(labels, class_mask, start, size)
        exp = jnp.exp(jnp.where(keep, logits - m, -jnp.inf))
        (grad_cos,) = logits_vjp(exp * grad_total)
        # As magjax.losses.base._cosines_backward: the norm's term from the centre gradient,
        # none through safe_norm's floor (the zero rows padding the classes).
        inv_norm = 1.0 / norm
        grad_raw = grad_cos * inv_norm[:, None]
        grad_product = jnp.einsum("cb,bd->cd", grad_raw, x_unit)
        radial_scale = jnp.where(norm > _NORM_EPS, inv_norm**2, 0.0)
        radial = (w_block * grad_product).sum(axis=1)
        grad_block = grad_product - radial[:, None] * (radial_scale[:, None] * w_block)
        grad_x = grad_x + jnp.einsum("cb,cd->bd", grad_raw, w_block)
        return grad_x, lax.dynamic_update_slice_in_dim(grad_w, grad_block, start, 0)

    carry = (_zeros_like_both(x_unit, weight, x_unit), _zeros_like_both(x_unit, weight, weight))
    grad_x, grad_w = _for_each_block(weight.shape[0], block, body, carry)
    return grad_x, grad_w, None, None, None, None


_blocked_sum_exp.defvjp(_blocked_sum_exp_forward, _blocked_sum_exp_backward)


def blocked_cross_entropy(
    x_unit: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    target_logit: jax.Array,
    loss: MarginLoss,
    *,
    block: int,
    context: Any = None,
    mask: jax.Array | None = None,
    class_mask: jax.Array | None = None,
    axis_name: str | None = None,
    online: bool | None = None,
) -> jax.Array:
    """:func:`magjax.losses.margin_cross_entropy` from the unit embeddings ``x_unit [B, d]`` and
    the raw centres ``weight [C, d]`` instead of their cosines, ``block`` classes at a time.

    The same loss, shift rule, ``axis_name`` combination over shards, probability floor and
    masks. ``online`` (default: only where the dtype has no room for the dense head's fixed
    shift) forces the running-max log-sum-exp, for the tests.
    """
    _, owned = _target_index(labels, weight.shape[0])
    target_logit = jnp.where(owned, target_logit, -jnp.inf)
    lowest_shift = _lowest_shift(loss, x_unit.dtype)
    if online is None:
        online = lowest_shift is None
    stopped_target = lax.stop_gradient(target_logit)
    if online:
        # Every non-target logit is at least -max_logit: a finite start for the running max.
        start = jnp.full(target_logit.shape, -loss.max_logit, x_unit.dtype)
        m, sum_exp = _blocked_sum_exp(
            loss, block, True, x_unit, weight, labels, class_mask, context, start
        )
        m = lax.stop_gradient(m)
        shift = jnp.maximum(stopped_target, m)
        if axis_name is not None:
            shift = lax.pmax(shift, axis_name)
        sum_exp = sum_exp * jnp.exp(m - shift)
    else:
        shift = jnp.maximum(stopped_target, -math.inf if lowest_shift is None else lowest_shift)
        if axis_name is not None:
            shift = lax.pmax(shift, axis_name)
        _, sum_exp = _blocked_sum_exp(
            loss, block, False, x_unit, weight, labels, class_mask, context, shift
        )
    return joined_cross_entropy(sum_exp, target_logit, owned, shift, loss, mask, axis_name)


def blocked_margin_loss(
    x_unit: jax.Array,
    weight: jax.Array,
    target_cos: jax.Array,
    labels: jax.Array,
    norms: jax.Array,
    loss: MarginLoss,
    state: dict,
    *,
    block: int,
    row_mask: jax.Array | None = None,
    class_mask: jax.Array | None = None,
    axis_name: str | None = None,
    return_logits: bool = False,
    online: bool | None = None,
) -> tuple[jax.Array, dict, dict]:
    """:func:`magjax.losses.margin_loss` over the centres ``weight [C_block, d]`` ``block``
    classes at a time: ``x_unit`` and ``target_cos`` as :func:`target_cosines` returns them
    (in the class-sharded head, ``target_cos`` summed over the shards), the other arguments as
    there. Returns ``(loss, metrics, new_state)``; ``metrics`` holds ``logits`` ``[C_block,
    B]`` only with ``return_logits`` (the reference checks; they cost the dense memory)."""
    c_target = clamp(target_cos, -loss.cosine_bound, loss.cosine_bound)
    margin = loss.margin(c_target, norms, state, row_mask)
    loss_ce = blocked_cross_entropy(
        x_unit,
        weight,
        labels,
        loss.s * margin.target,
        loss,
        block=block,
        context=margin.context,
        mask=row_mask,
        class_mask=class_mask,
        axis_name=axis_name,
        online=online,
    )
    metrics = {"loss_ce": loss_ce, **(margin.metrics or {})}
    if return_logits:
        cos = _block_cosines(lax.stop_gradient(x_unit), lax.stop_gradient(weight))[0]
        non_target = _non_target(labels, None, cos.shape[0])
        metrics["logits"] = lax.stop_gradient(
            jnp.where(
                non_target, loss.non_target_logits(cos, margin.context), loss.s * margin.target
            )
        )
    new_state = state if margin.state is None else margin.state
    return loss_ce + margin.penalty, metrics, new_state


def blocked_dense_loss(
    embeddings: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    loss: MarginLoss,
    state: dict | None = None,
    *,
    block: int,
    online: bool | None = None,
) -> tuple[jax.Array, dict, dict]:
    """:func:`magjax.losses.dense_loss` (one device), ``block`` classes at a time."""
    state = loss.initial_state() if state is None else state
    x_unit, target_cos = target_cosines(embeddings, weight, labels)
    norms = safe_norm(embeddings.astype(x_unit.dtype))
    return blocked_margin_loss(
        x_unit,
        weight.astype(x_unit.dtype),
        target_cos,
        labels,
        norms,
        loss,
        state,
        block=block,
        online=online,
    )
