"""The margin-loss interface and what every loss shares: cosines, the cross entropy over
classes (dense, or over class shards), the registry.

Notation (as in docs/official-losses.md): ``x_i`` raw embedding, ``W_j`` class centre (a row of
``W``, shape ``[C, d]``), ``c_ij = x̂_i · Ŵ_j`` the cosine, ``θ = arccos c``, ``s`` the scale,
``y_i`` the label.

A loss (:class:`MarginLoss`, one subclass per module of this package) maps the target cosines
``[B]`` to target values (:meth:`MarginLoss.margin`) and the other cosines to logits
(:meth:`MarginLoss.non_target_logits`); :func:`margin_loss` joins them in one softmax cross
entropy. A sample's label may be missing from a block of classes: in the class-sharded head
(``magjax.head``) the label of a sample may live on another shard, exactly as arcface_torch marks
it with label ``-1``; the margin is then computed from the target cosine gathered from the
owning shard. Cross entropy takes an optional mesh axis name, so the same code computes the
softmax over one device's classes or, inside ``jax.shard_map``, over every shard with
``pmax``/``psum``.

The cosine and logit matrices are class-major, ``[C, B]`` (entry ``[j, i]`` pairs class ``j``
with sample ``i``), so every softmax reduction runs over the leading axis: XLA on CPU
vectorises that reduction across the samples and runs it about ten times faster than the same
reduction over the minor axis of a ``[B, C]`` matrix (BENCHMARKS.md, head step). The reference
files (``magjax.refcheck``) keep the usual ``[B, C]`` logits.

Head math runs in float32 even for bfloat16 embeddings (float64 when x64 inputs are given).
Clamps use :func:`clamp`, whose gradient passes at the bounds as ``torch.clamp`` does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# torch.nn.functional.normalize's eps: norms are floored here.
_NORM_EPS = 1e-12


def head_dtype(dtype: Any) -> jnp.dtype:
    """float32 for float32/bf16/fp16 inputs, float64 for float64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)


def clamp(x: jax.Array, low: Any, high: Any) -> jax.Array:
    """``min(max(x, low), high)`` with ``torch.clamp``'s gradient: 1 inside *and at* the bounds.

    ``jnp.clip`` splits the gradient at a tie; the official code keeps it whole.
    """
    return jnp.where(x < low, low, jnp.where(x > high, high, x))


def safe_norm(
    x: jax.Array, axis: int = -1, keepdims: bool = False, eps: float = _NORM_EPS
) -> jax.Array:
    """``max(||x||, eps)`` with a finite gradient at ``x = 0`` (``jnp.linalg.norm``'s is NaN,
    which would poison the zero rows that pad the class centres and the batch)."""
    return jnp.sqrt(jnp.maximum((x * x).sum(axis=axis, keepdims=keepdims), eps * eps))


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = _NORM_EPS) -> jax.Array:
    """``x / max(||x||, eps)`` along ``axis`` (``torch.nn.functional.normalize``)."""
    return x / safe_norm(x, axis=axis, keepdims=True, eps=eps)


def cosine_similarity(
    embeddings: jax.Array, weight: jax.Array, labels: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Class-major cosines and each sample's target cosine, for raw embeddings ``[B, d]``, raw
    class centres ``[C, d]`` (rows) and labels ``[B]``.

    Returns ``(cos, target_cos)``: ``cos [C, B]`` with entry ``[j, i] = x̂_i · Ŵ_j``, and
    ``target_cos [B] = cos[y_i, i]``, 0 where ``y_i`` is outside ``[0, C)`` (a label this block
    of classes does not hold). Both are normalised in the head dtype (float32 for bf16 inputs);
    no clamp is applied here, each loss clamps as its official code does.
    """
    dtype = head_dtype(jnp.result_type(embeddings, weight))
    x_unit = l2_normalize(embeddings.astype(dtype))
    return _cosines_by_class(x_unit, weight.astype(dtype), labels)


# Hand-written VJP, for memory traffic: the head's cost beyond its three matrix products is the
# number of passes over [C, B] arrays. The centres are not normalised in memory: the [C, B]
# product is scaled by 1/||W_j||, which saves writing and reading back a normalised [C, d]
# copy. Autodiff of that scaling would keep the cosine gradient and the gradient of the raw
# product as two [C, B] arrays and fold the norm's gradient into a separate [C, d] pass; here
# one [C, B] array (the target entries added in place) feeds both matrix products and the
# norm's term is formed from the centre gradient, so that no [C, B] array of this function is
# kept for the backward pass. Gathering the target cosines reads B entries where a one-hot
# reduction would read all C·B.
@jax.custom_vjp
def _cosines_by_class(x_unit, weight, labels):
    return _cosines_forward(x_unit, weight, labels)[0]


def _target_index(labels, num_classes):
    """Rows of the targets (clipped into range) and whether each label is in this block."""
    return jnp.clip(labels, 0, num_classes - 1), (labels >= 0) & (labels < num_classes)


def _cosines_forward(x_unit, weight, labels):
    norm = safe_norm(weight)
    raw = jnp.einsum("cd,bd->cb", weight, x_unit, preferred_element_type=x_unit.dtype)
    cos = raw * (1.0 / norm)[:, None]
    rows, owned = _target_index(labels, weight.shape[0])
    target_cos = jnp.where(owned, jnp.take_along_axis(cos, rows[None, :], axis=0)[0], 0.0)
    return (cos, target_cos), (x_unit, weight, labels, norm)


def _cosines_backward(residuals, cotangents):
    x_unit, weight, labels, norm = residuals
    grad_cos, grad_target = cotangents
    inv_norm = 1.0 / norm
    rows, owned = _target_index(labels, weight.shape[0])
    grad_raw = (
        (grad_cos * inv_norm[:, None])
        .at[rows, jnp.arange(labels.shape[0])]
        .add(jnp.where(owned, grad_target * inv_norm[rows], 0.0))
    )
    grad_product = jnp.einsum("cb,bd->cd", grad_raw, x_unit)
    # ∂(1/||W_j||)/∂W_j = -W_j/||W_j||³, and Σ_i grad_cos_ji raw_ji = ||W_j|| Σ_i grad_raw_ji
    # raw_ji = ||W_j|| W_j · grad_product_j: a row reduction over [C, d], so that the [C, B]
    # product is not kept for the backward pass. safe_norm's floor (norm = eps: the zero
    # padding rows) passes no gradient. The per-class factor multiplies the [C, d] rows, not
    # the row sums: XLA:CPU (YNNPACK) runs a row reduction that ends in a [C] elementwise
    # factor ~5x slower than the bare reduction.
    radial_scale = jnp.where(norm > _NORM_EPS, inv_norm**2, 0.0)
    radial = (weight * grad_product).sum(axis=1)
    grad_weight = grad_product - radial[:, None] * (radial_scale[:, None] * weight)
    grad_x = jnp.einsum("cb,cd->bd", grad_raw, weight)
    return grad_x, grad_weight, None


_cosines_by_class.defvjp(_cosines_forward, _cosines_backward)


def sin_from_cos(c: jax.Array) -> jax.Array:
    """``sqrt(1 - c^2)``; the derivative is infinite at ``c = ±1`` (as in the official code)."""
    return jnp.sqrt(jnp.maximum(1.0 - c * c, 0.0))


def cos_add(c: jax.Array, margin: Any) -> jax.Array:
    """``cos(θ + m) = c cos m - sin θ sin m`` with ``θ = arccos c``."""
    return c * jnp.cos(margin) - sin_from_cos(c) * jnp.sin(margin)


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of ``values`` over the entries where ``mask`` is true (all without a mask)."""
    if mask is None:
        return values.mean()
    weights = mask.astype(values.dtype)
    return (weights * values).sum() / weights.sum()


# --------------------------------------------------------------------------------------------
# The loss interface: one frozen dataclass per loss, in its own module of this package.


class Margin(NamedTuple):
    """What a loss makes of one batch's target cosines (:meth:`MarginLoss.margin`).

    ``target`` ``[B]``: each sample's target value before the scale ``s``; ``context``: what
    :meth:`MarginLoss.non_target_logits` needs besides the cosines (None for most losses);
    ``penalty``: a scalar added to the cross entropy (MagFace's ``λ_g · mean g(a)``);
    ``metrics``: scalars to log; ``state``: the loss state after this batch.
    """

    target: jax.Array
    context: Any = None
    penalty: Any = 0.0
    metrics: dict | None = None
    state: dict | None = None


@dataclasses.dataclass(frozen=True)
class MarginLoss:
    """A configured margin loss; frozen, so it can be a static argument of ``jax.jit``.

    Each loss is a subclass in a module of this package, registered under its ``name`` with
    :func:`register`. Its dataclass fields are its hyper-parameters, with the official defaults;
    it says how the target cosine becomes the target logit and what the loss adds (penalty,
    metrics, state, :meth:`margin`), and how the non-target cosines become logits
    (:meth:`non_target_logits`). The cross entropy over classes, dense or sharded, is shared
    (:func:`margin_loss`).
    """

    name: ClassVar[str]
    # True when every non-target logit is ``s · clamp(c)`` or a constant with no gradient
    # (arcface_torch's filtering): the cross entropy then keeps one [C, B] array for the
    # backward pass instead of the cosines and masks autodiff would keep (_sum_exp_over_classes).
    elementwise_scaled_non_target: ClassVar[bool] = True
    # Metrics of the loss shown on the training progress line.
    progress_metrics: ClassVar[tuple[str, ...]] = ()

    s: float = 64.0
    # None: plain log-softmax cross entropy; 1e-30 reproduces arcface_torch's DistCrossEntropy.
    probability_floor: float | None = None

    @classmethod
    def create(cls, name: str, **hparams: Any) -> MarginLoss:
        """The registered loss ``name`` with its official defaults updated with ``hparams``."""
        loss_class = registered().get(name)
        if loss_class is None:
            raise ValueError(f"unknown loss {name!r}; expected one of {sorted(registered())}")
        unknown = set(hparams) - set(loss_class.field_names())
        if unknown:
            raise ValueError(
                f"unknown hyper-parameters {sorted(unknown)} for loss {name!r} "
                f"(its fields: {', '.join(loss_class.field_names())})"
            )
        return loss_class(**hparams)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @property
    def cosine_bound(self) -> float:
        """Cosines are clamped to ``±bound`` before the margin (AdaFace: ``1 - eps``)."""
        return 1.0

    @property
    def max_logit(self) -> float:
        """A bound on every non-target logit's magnitude (the log-sum-exp's shift floor)."""
        return self.s * self.cosine_bound

    def initial_state(self) -> dict:
        """The loss's carried state (e.g. AdaFace's EMA statistics; ``{}`` for most)."""
        return {}

    def margin(
        self, c_target: jax.Array, norms: jax.Array, state: dict, row_mask: jax.Array | None
    ) -> Margin:
        """The margin on the clamped target cosines ``[B]`` of the whole (global) batch, from
        the raw embedding norms ``[B]`` (with gradient), the state and the valid rows."""
        raise NotImplementedError

    def non_target_logits(self, cos: jax.Array, context: Any) -> jax.Array:
        """``s · clamp(c, ±bound)`` for the non-target entries of class-major ``cos [C, B]``."""
        bound = self.cosine_bound
        return self.s * clamp(cos, -bound, bound)


_REGISTRY: dict[str, type[MarginLoss]] = {}


def register(loss_class: type[MarginLoss]) -> type[MarginLoss]:
    """Class decorator: makes a :class:`MarginLoss` subclass available by its ``name``."""
    _REGISTRY[loss_class.name] = loss_class
    return loss_class


def registered() -> dict[str, type[MarginLoss]]:
    """Every loss of the package by name (its modules are imported by ``magjax.losses``)."""
    return dict(_REGISTRY)


# --------------------------------------------------------------------------------------------
# Softmax cross entropy over class-major cosines, dense or over class shards.


def _non_target(labels: jax.Array, class_mask: jax.Array | None, num_classes: int) -> jax.Array:
    """``[C, B]`` mask of the entries that enter the softmax besides each sample's target."""
    classes = lax.broadcasted_iota(labels.dtype, (num_classes, labels.shape[0]), 0)
    keep = classes != labels
    return keep if class_mask is None else keep & class_mask[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sum_exp_over_classes(loss, cos, labels, class_mask, shift):
    """``Σ_j exp(z_ji - shift_i)`` over the non-target classes ``j`` (axis 0), ``[B]``, with
    ``z = loss.non_target_logits(cos, None)`` (losses with ``elementwise_scaled_non_target``).

    Autodiff would keep the exponentials and the masks inside the logits as ``[C, B]``
    residuals, each written to memory in the forward pass and read back in the backward one.
    Here the one residual is the exponentials, negated where the logit passes no gradient (a
    clamped or filtered cosine: the slope of ``z`` is ``s`` or 0), so that the cosines are not
    kept for the backward pass, which forms the cosine gradient ``grad_i · s · max(e_ji, 0)``
    from that array alone. ``shift`` (stopped, as in every log-sum-exp) gets no gradient.
    """
    return _shifted_exp(loss.non_target_logits(cos, None), labels, class_mask, shift).sum(axis=0)


def _shifted_exp(logits, labels, class_mask, shift):
    """``exp(z - shift)`` at the non-target entries, 0 elsewhere (the mask inside the exponent
    keeps it one elementwise pass)."""
    keep = _non_target(labels, class_mask, logits.shape[0])
    return jnp.exp(jnp.where(keep, logits - shift, -jnp.inf))


def _sum_exp_forward(loss, cos, labels, class_mask, shift):
    logits, slope = jax.jvp(
        lambda c: loss.non_target_logits(c, None), (cos,), (jnp.ones_like(cos),)
    )
    # The barrier stores the signed array itself; without it XLA stores the exponentials and
    # recomputes the sign from the cosines in the backward pass, keeping them alive.
    signed_exp = lax.optimization_barrier(
        jnp.where(slope != 0, 1.0, -1.0) * _shifted_exp(logits, labels, class_mask, shift)
    )
    return jnp.abs(signed_exp).sum(axis=0), (signed_exp, shift)


def _sum_exp_backward(loss, residuals, grad):
    signed_exp, shift = residuals
    return (grad * loss.s) * jnp.maximum(signed_exp, 0.0), None, None, jnp.zeros_like(shift)


_sum_exp_over_classes.defvjp(_sum_exp_forward, _sum_exp_backward)


def _lowest_shift(loss: MarginLoss, dtype: Any) -> float | None:
    """``c0 = s · bound - K``, the log-sum-exp shift's floor, or None if ``dtype`` has no room.

    With the shift ``max(target_i, c0)``, each term ``exp(z - shift)`` is at most ``e^K`` (every
    non-target logit is at most ``loss.max_logit``), so up to 2^31 classes sum below the dtype's
    max; and the largest term is at least ``e^(K - 2 max_logit)`` (non-target logits are at
    least ``-max_logit``), kept 7 e-folds above the smallest normal number.
    """
    info = jnp.finfo(dtype)
    headroom = math.log(info.max) - 31 * math.log(2) - 1  # K
    top = loss.max_logit
    if headroom < 2 * top + math.log(info.tiny) + 7:
        return None
    return top - headroom


def margin_cross_entropy(
    cos: jax.Array,
    labels: jax.Array,
    target_logit: jax.Array,
    loss: MarginLoss,
    *,
    context: Any = None,
    mask: jax.Array | None = None,
    class_mask: jax.Array | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """Mean over samples of ``-log softmax(z_·i)[y_i]``, in the cosines' (float32+) dtype.

    The logits are ``loss.non_target_logits(cos, context)`` for every class but the target,
    whose logit is ``target_logit_i``. ``cos`` is class-major ``[C, B]``; ``labels`` ``[B]``
    index its rows, and a label outside ``[0, C)`` marks a sample whose class is not in this
    block (a shard that does not own it), where ``target_logit`` is ignored. For losses whose
    non-target logits are ``s · clamp(c)`` the ``[C, B]`` logits are never stored (their
    exponentials are, once): they are computed from ``cos`` where needed.

    The log-sum-exp is shifted by ``max(target_logit_i, c0)`` with a constant ``c0`` (see
    :func:`_lowest_shift`) rather than by the largest logit: no pass over ``[C, B]`` for a max,
    and the same accuracy (the loss is ``log Σ`` when the target dominates, else a sum of two
    positive terms). Scales too large for the dtype (float32: ``s > 73``) fall back to
    ``s · clamp(max_j c_ji)`` (other non-target logits: their largest value).

    With ``axis_name`` the class axis is split over that mesh axis: the shift is combined with
    ``pmax`` and the sum of exponentials and the target logit with ``psum`` (arcface_torch's
    DistCrossEntropy), so no device holds the logits of another's classes.

    ``loss.probability_floor`` (arcface_torch: 1e-30) computes ``-log(max(p, floor))`` forward, i.e.
    caps each sample's loss at ``-log(floor)`` (69.0776), while the gradient is the uncapped
    ``(softmax - onehot)/B`` as in DistCrossEntropy's hand-written backward. ``mask`` ``[B]``
    excludes padded samples: the mean is over the samples it keeps. ``class_mask`` ``[C]``
    excludes padded classes from the softmax.
    """
    _, owned = _target_index(labels, cos.shape[0])
    target_logit = jnp.where(owned, target_logit, -jnp.inf)
    lean = loss.elementwise_scaled_non_target
    logits = None if lean else loss.non_target_logits(cos, context)
    lowest_shift = _lowest_shift(loss, cos.dtype)
    if lowest_shift is None and lean:
        bound = loss.cosine_bound
        lowest_shift = loss.s * clamp(lax.stop_gradient(cos).max(axis=0), -bound, bound)
    elif lowest_shift is None:
        lowest_shift = lax.stop_gradient(logits).max(axis=0)
    shift = jnp.maximum(lax.stop_gradient(target_logit), lowest_shift)
    if axis_name is not None:
        shift = lax.pmax(shift, axis_name)
    if lean:
        sum_exp = _sum_exp_over_classes(loss, cos, labels, class_mask, shift)
    else:
        sum_exp = _shifted_exp(logits, labels, class_mask, shift).sum(axis=0)
    return joined_cross_entropy(sum_exp, target_logit, owned, shift, loss, mask, axis_name)


def joined_cross_entropy(
    sum_exp: jax.Array,
    target_logit: jax.Array,
    owned: jax.Array,
    shift: jax.Array,
    loss: MarginLoss,
    mask: jax.Array | None,
    axis_name: str | None,
) -> jax.Array:
    """The mean cross entropy from each sample's sum of shifted non-target exponentials (over
    this shard's classes), its target logit (where this shard owns the label) and the shift:
    shards joined with ``psum`` over ``axis_name``, arcface_torch's probability floor applied
    (forward only), padded samples (``mask``) left out. Shared by the dense and the blocked
    cross entropy (:mod:`magjax.losses.blocked`)."""
    sum_exp = sum_exp + jnp.exp(target_logit - shift)
    target = jnp.where(owned, target_logit, 0.0)
    if axis_name is not None:
        sum_exp = lax.psum(sum_exp, axis_name)
        target = lax.psum(target, axis_name)
    per_sample = jnp.log(sum_exp) + shift - target
    if loss.probability_floor is not None:
        cap = -math.log(loss.probability_floor)
        per_sample = per_sample + lax.stop_gradient(jnp.minimum(per_sample, cap) - per_sample)
    return masked_mean(per_sample, mask)


def margin_loss(
    cos: jax.Array,
    target_cos: jax.Array,
    labels: jax.Array,
    norms: jax.Array,
    loss: MarginLoss,
    state: dict,
    *,
    row_mask: jax.Array | None = None,
    class_mask: jax.Array | None = None,
    axis_name: str | None = None,
) -> tuple[jax.Array, dict, dict]:
    """Total loss of one block of classes: cross entropy plus the loss's penalty.

    Args:
      cos: raw class-major cosines ``[C_block, B]`` (clamped as the loss's official code does).
      target_cos: each sample's target cosine ``[B]``, wherever its class lives (the sharded
        head gathers it from the owning shard): :meth:`MarginLoss.margin` sees the whole batch.
      labels: ``[B]`` each sample's class within this block, outside ``[0, C_block)`` when the
        block does not hold it.
      norms: raw embedding norms ``||x_i||`` ``[B]``, with gradient (MagFace uses it).
      loss, state: the loss and its state (``{}`` for stateless losses).
      row_mask: valid samples ``[B]`` (padding excluded from statistics and the mean), or None.
      class_mask: the real (not padding) classes ``[C_block]``, or None.
      axis_name: the mesh axis the classes are sharded over (see
        :func:`margin_cross_entropy`); ``cos``, ``norms`` and ``row_mask`` then cover the global
        batch on every shard.

    Returns:
      ``(loss, metrics, new_state)`` where ``metrics`` has ``loss_ce``, the loss's own scalars
      (e.g. MagFace's ``loss_g``) and this block's class-major ``logits`` ``[C_block, B]``,
      ``s · (c with the margin on the target)`` (dropped by jit when unused).
    """
    c_target = clamp(target_cos, -loss.cosine_bound, loss.cosine_bound)
    margin = loss.margin(c_target, norms, state, row_mask)
    loss_ce = margin_cross_entropy(
        cos,
        labels,
        loss.s * margin.target,
        loss,
        context=margin.context,
        mask=row_mask,
        class_mask=class_mask,
        axis_name=axis_name,
    )
    non_target = _non_target(labels, None, cos.shape[0])
    logits = jnp.where(
        non_target, loss.non_target_logits(cos, margin.context), loss.s * margin.target
    )
    metrics = {"loss_ce": loss_ce, **(margin.metrics or {}), "logits": logits}
    new_state = state if margin.state is None else margin.state
    return loss_ce + margin.penalty, metrics, new_state


def dense_loss(
    embeddings: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    loss: MarginLoss,
    state: dict | None = None,
) -> tuple[jax.Array, dict, dict]:
    """The whole margin loss on one device: raw embeddings ``[B, d]``, centres ``[C, d]``.

    Returns ``(loss, metrics, new_state)`` as :func:`margin_loss`.
    """
    state = loss.initial_state() if state is None else state
    cos, target_cos = cosine_similarity(embeddings, weight, labels)
    norms = safe_norm(embeddings.astype(cos.dtype))
    return margin_loss(cos, target_cos, labels, norms, loss, state)
