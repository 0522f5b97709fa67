"""Margin losses for face recognition as pure, jit-able functions of arrays.

Notation (as in ../shared/docs/official-losses.md): ``x_i`` raw embedding, ``W_j`` class centre
(a row of ``W``, shape ``[C, d]``), ``c_ij = x̂_i · Ŵ_j`` the cosine, ``θ = arccos c``, ``s`` the
scale, ``y_i`` the label.

Every margin changes only the target entry ``c_{i,y_i}`` of each sample, so the margin functions
map the vector of target cosines ``[B]`` to new target values ``[B]`` (:func:`margin_targets`);
the cross entropy takes them beside the cosine matrix and the labels. A sample's label may
be missing from a block of classes: in the class-sharded head (``magjax.head``) a sample whose
label lives on another shard gets no margin there, exactly as arcface_torch marks it with label
``-1``. Cross entropy takes an optional mesh axis name, so the same code computes the softmax
over one device's classes or, inside ``jax.shard_map``, over every shard with ``pmax``/``psum``.

The cosine and logit matrices are class-major, ``[C, B]`` (entry ``[j, i]`` pairs class ``j``
with sample ``i``), so every softmax reduction runs over the leading axis: XLA on CPU
vectorises that reduction across the samples and runs it about ten times faster than the same
reduction over the minor axis of a ``[B, C]`` matrix (BENCHMARKS.md, head step). The reference
files and :func:`value_and_grads` keep the usual ``[B, C]`` logits.

Head math runs in float32 even for bfloat16 embeddings (float64 when x64 inputs are given).
Clamps use :func:`clamp`, whose gradient passes at the bounds as ``torch.clamp`` does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

# arcface_torch's DistCrossEntropy floors the target probability at 1e-30 (loss cap 69.0776).
INSIGHTFACE_PROBABILITY_FLOOR = 1e-30
# AdaFace's initial EMA buffers (head.py: batch_mean = 20, batch_std = 100).
ADAFACE_INITIAL_STATE = {"batch_mean": 20.0, "batch_std": 100.0}

# torch.nn.functional.normalize's eps: norms are floored here.
_NORM_EPS = 1e-12

ARCFACE_VARIANTS = ("insightface", "paper", "classic", "easy")
COMBINED_VARIANTS = ("insightface", "paper")


def head_dtype(dtype: Any) -> jnp.dtype:
    """float32 for float32/bf16/fp16 inputs, float64 for float64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)


def clamp(x: jax.Array, low: Any, high: Any) -> jax.Array:
    """``min(max(x, low), high)`` with ``torch.clamp``'s gradient: 1 inside *and at* the bounds.

    ``jnp.clip`` splits the gradient at a tie; the official code keeps it whole.
    """
    return jnp.where(x < low, low, jnp.where(x > high, high, x))


def safe_norm(x: jax.Array, axis: int = -1, keepdims: bool = False, eps: float = _NORM_EPS
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
    grad_raw = (grad_cos * inv_norm[:, None]).at[rows, jnp.arange(labels.shape[0])].add(
        jnp.where(owned, grad_target * inv_norm[rows], 0.0))
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


def _sin_from_cos(c: jax.Array) -> jax.Array:
    """``sqrt(1 - c^2)``; the derivative is infinite at ``c = ±1`` (as in the official code)."""
    return jnp.sqrt(jnp.maximum(1.0 - c * c, 0.0))


def _cos_add(c: jax.Array, margin: Any) -> jax.Array:
    """``cos(θ + m) = c cos m - sin θ sin m`` with ``θ = arccos c``."""
    return c * jnp.cos(margin) - _sin_from_cos(c) * jnp.sin(margin)


# --------------------------------------------------------------------------------------------
# Target-entry margins: each maps target cosines [B] to target values [B] (before the scale s).


def arcface_target(c: jax.Array, m: float, variant: str = "insightface") -> jax.Array:
    """ArcFace additive angular margin on the target cosine: ``cos(θ + m)``.

    variant:
      * ``"insightface"`` — arcface_torch (``ArcFace`` and ``CombinedMarginLoss`` with m1=1,
        m3=0): forward ``cos(arccos(c) + m)`` with no fallback when ``θ + m > π`` (the value
        rises again there), gradient straight-through (``∂/∂c = 1``: the margin is computed
        under ``stop_gradient``).
      * ``"paper"`` — the paper's loss with exact autodiff, no fallback.
      * ``"classic"`` — original MXNet ArcFace and InsightFace_TF: ``cos(θ + m)`` while
        ``θ + m ≤ π`` (``c > cos(π - m)``), else ``c - m sin m``; exact autodiff.
      * ``"easy"`` — easy margin: ``cos(θ + m)`` where ``c > 0``, else ``c``; exact autodiff.
    """
    if variant == "insightface":
        return c + lax.stop_gradient(jnp.cos(jnp.arccos(c) + m) - c)
    if variant == "paper":
        return _cos_add(c, m)
    if variant == "classic":
        return jnp.where(c > math.cos(math.pi - m), _cos_add(c, m), c - m * math.sin(m))
    if variant == "easy":
        return jnp.where(c > 0, _cos_add(c, m), c)
    raise ValueError(f"unknown ArcFace variant {variant!r}; expected one of {ARCFACE_VARIANTS}")


def cosface_target(c: jax.Array, m: float) -> jax.Array:
    """CosFace additive cosine margin: ``c - m`` (arcface_torch ``CosFace``; exact gradient)."""
    return c - m


def combined_target(
    c: jax.Array, m1: float, m2: float, m3: float, variant: str = "insightface"
) -> jax.Array:
    """Combined margin ``cos(m1 θ + m2) - m3`` (ArcFace paper, eq. 4; SphereFace's m1 included).

    variant:
      * ``"paper"`` — the formula with exact autodiff (``θ = arccos c``, no fallback).
      * ``"insightface"`` — arcface_torch ``CombinedMarginLoss`` as coded: with ``m1 == 1`` and
        ``m3 == 0`` the ``"insightface"`` ArcFace path with margin ``m2``; otherwise with
        ``m3 > 0`` *only* CosFace with ``m3`` (``m2`` is ignored, e.g. (1, 0.3, 0.2) is CosFace
        0.2); any other setting is an error there too (``m1`` is never applied).
    """
    if variant == "paper":
        return jnp.cos(m1 * jnp.arccos(c) + m2) - m3
    if variant != "insightface":
        raise ValueError(f"unknown combined variant {variant!r}; expected {COMBINED_VARIANTS}")
    if m1 == 1.0 and m3 == 0.0:
        return arcface_target(c, m2, "insightface")
    if m3 > 0:
        return cosface_target(c, m3)
    raise ValueError(
        f"arcface_torch CombinedMarginLoss supports (1, m2, 0) or m3 > 0, got ({m1}, {m2}, {m3});"
        " use variant='paper' for the general combined margin"
    )


def magface_magnitude(norms: jax.Array, l_a: float, u_a: float) -> jax.Array:
    """MagFace magnitude ``a = clamp(||x||, l_a, u_a)``; *not* detached (official MagLinear)."""
    return clamp(norms, l_a, u_a)


def magface_margin(a: jax.Array, l_a: float, u_a: float, l_m: float, u_m: float) -> jax.Array:
    """``m(a) = (u_m - l_m)/(u_a - l_a) · (a - l_a) + l_m``, linear in the magnitude."""
    return (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m


def magface_regularizer(a: jax.Array, u_a: float) -> jax.Array:
    """``g(a) = a/u_a² + 1/a``, convex and minimal at ``a = u_a`` (per sample)."""
    return a / u_a**2 + 1.0 / a


def magface_target(c: jax.Array, margin: jax.Array, easy_margin: bool = True) -> jax.Array:
    """MagFace target with a per-sample margin ``m(a)``, exact autodiff (official ``MagLinear``).

    ``easy_margin=True`` (the official default, used by the trainer): ``cos(θ + m)`` where
    ``c > 0`` else ``c``. ``easy_margin=False``: ``cos(θ + m)`` where ``c > cos(π - m)``, else
    ``c - m sin m``. Gradient flows into ``margin`` (hence into the magnitude).
    """
    cos_theta_m = _cos_add(c, margin)
    if easy_margin:
        return jnp.where(c > 0, cos_theta_m, c)
    threshold = jnp.cos(math.pi - margin)
    return jnp.where(c > threshold, cos_theta_m, c - jnp.sin(math.pi - margin) * margin)


def magface_min_lambda_g(s: float, l_a: float, u_a: float, l_m: float, u_m: float) -> float:
    """Smallest ``λ_g`` for which the MagFace paper's convexity guarantee holds.

    ``λ_g ≥ s · k · u_a² l_a² / (u_a² - l_a²)`` with ``k = (u_m - l_m)/(u_a - l_a)``
    (≈ 22.6 for the defaults; the official trainer prints it in red below the bound).
    """
    k = (u_m - l_m) / (u_a - l_a)
    return s * k * u_a**2 * l_a**2 / (u_a**2 - l_a**2)


def adaface_update_state(
    norms: jax.Array, state: dict, t_alpha: float, mask: jax.Array | None = None
) -> dict:
    """EMA of the feature-norm mean and *unbiased* std (``torch.std``, ddof 1; NaN for one row).

    ``norms`` are the detached, clipped norms of the whole global batch (``mask`` drops padded
    rows). magjax takes the statistics over the global batch, so every device holds the same
    state; the official code takes them per GPU over its local batch (no all-reduce).
    """
    norms = lax.stop_gradient(norms)
    weights = jnp.ones_like(norms) if mask is None else mask.astype(norms.dtype)
    count = weights.sum()
    mean = (weights * norms).sum() / count
    std = jnp.sqrt((weights * (norms - mean) ** 2).sum() / (count - 1))
    return {
        "batch_mean": t_alpha * mean + (1 - t_alpha) * state["batch_mean"],
        "batch_std": t_alpha * std + (1 - t_alpha) * state["batch_std"],
    }


def adaface_margin_scaler(norms: jax.Array, state: dict, h: float, eps: float = 1e-3) -> jax.Array:
    """``ẑ = clip(h · (||z|| - μ)/(σ + eps), -1, 1)`` from detached norms and the updated EMA."""
    scaler = h * (lax.stop_gradient(norms) - state["batch_mean"]) / (state["batch_std"] + eps)
    return clamp(scaler, -1.0, 1.0)


def adaface_target(c: jax.Array, scaler: jax.Array, m: float, eps: float = 1e-3) -> jax.Array:
    """AdaFace target ``cos(clip(θ - m ẑ, eps, π - eps)) - m (1 + ẑ)`` (official head, exact grad).

    The official head also clips every non-target angle to ``[eps, π - eps]``; since its cosines
    are clamped to ``±(1 - eps)`` first and ``cos(eps) > 1 - eps``, that clip never changes a
    non-target value, so only the target is transformed here.
    """
    theta = clamp(jnp.arccos(c) - m * scaler, eps, math.pi - eps)
    return jnp.cos(theta) - m * (1.0 + scaler)


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of ``values`` over the entries where ``mask`` is true (all without a mask)."""
    if mask is None:
        return values.mean()
    weights = mask.astype(values.dtype)
    return (weights * values).sum() / weights.sum()


# --------------------------------------------------------------------------------------------
# The losses as configured: which margin, which official behaviour.


@dataclasses.dataclass(frozen=True)
class MarginLoss:
    """One configured margin loss; hashable, so it can be a static argument of ``jax.jit``.

    ``name`` selects the loss; the fields each loss reads are listed in :func:`margin_targets`.
    Defaults are the official ones (arcface_torch for ArcFace/CosFace/combined, the MagFace run
    scripts, the AdaFace run scripts).
    """

    name: str = "arcface"
    s: float = 64.0
    m: float = 0.5
    arcface_variant: str = "insightface"
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    combined_variant: str = "insightface"
    # arcface_torch CombinedMarginLoss(interclass_filtering_threshold); 0 is off.
    interclass_filtering_threshold: float = 0.0
    l_a: float = 10.0
    u_a: float = 110.0
    l_m: float = 0.45
    u_m: float = 0.8
    lambda_g: float = 35.0
    easy_margin: bool = True
    h: float = 0.333
    t_alpha: float = 0.01
    adaface_eps: float = 1e-3
    # None: plain log-softmax CE (MagFace, AdaFace); 1e-30 reproduces DistCrossEntropy.
    probability_floor: float | None = None

    @classmethod
    def create(cls, name: str, **hparams: Any) -> MarginLoss:
        """Official defaults for ``name`` updated with ``hparams`` (unknown keys are errors)."""
        defaults: dict[str, Any] = {
            "arcface": {"m": 0.5, "probability_floor": INSIGHTFACE_PROBABILITY_FLOOR},
            "cosface": {"m": 0.4, "probability_floor": INSIGHTFACE_PROBABILITY_FLOOR},
            "combined": {"probability_floor": INSIGHTFACE_PROBABILITY_FLOOR},
            "magface": {},
            "adaface": {"m": 0.4},
        }
        if name not in defaults:
            raise ValueError(f"unknown loss {name!r}; expected one of {sorted(defaults)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(hparams) - fields
        if unknown:
            raise ValueError(f"unknown hyper-parameters {sorted(unknown)} for loss {name!r}")
        return cls(name=name, **{**defaults[name], **hparams})

    @property
    def cosine_bound(self) -> float:
        """Cosines are clamped to ``±bound`` before the margin (AdaFace: ``1 - eps``)."""
        return 1.0 - self.adaface_eps if self.name == "adaface" else 1.0

    @property
    def has_state(self) -> bool:
        return self.name == "adaface"

    def initial_state(self) -> dict:
        """The loss's carried state (AdaFace's EMA statistics; empty for the others)."""
        return dict(ADAFACE_INITIAL_STATE) if self.has_state else {}


# The fields of MarginLoss each loss reads besides ``name``: its own margin fields (read by
# margin_targets) and those every loss reads (scale, inter-class filtering, probability floor).
# magjax.config_check rejects a change to a field the chosen loss does not read.
SHARED_FIELDS = ("s", "interclass_filtering_threshold", "probability_floor")
FIELDS_READ = {
    name: SHARED_FIELDS + own for name, own in {
        "arcface": ("m", "arcface_variant"),
        "cosface": ("m",),
        "combined": ("m1", "m2", "m3", "combined_variant"),
        "magface": ("l_a", "u_a", "l_m", "u_m", "lambda_g", "easy_margin"),
        "adaface": ("m", "h", "t_alpha", "adaface_eps"),
    }.items()
}


def margin_targets(
    c_target: jax.Array,
    norms: jax.Array,
    loss: MarginLoss,
    state: dict,
    *,
    row_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict, dict]:
    """The loss's margin on the target cosines, before the scale ``s``.

    Args:
      c_target: clamped target cosines ``c_{i,y_i}`` ``[B]`` (anything where not owned).
      norms: raw embedding norms ``||x_i||`` ``[B]``, with gradient (MagFace uses it).
      loss: the configured loss.
      state: the loss state (AdaFace EMA), ``{}`` for stateless losses.
      row_mask: valid samples ``[B]`` (padding excluded from statistics), or None.

    Returns:
      ``(target [B], aux, new_state)``; ``aux`` holds per-sample terms the total loss needs
      (``"magface_g"``: ``g(a)`` per sample) and diagnostics (``"margin"``).
    """
    dtype = c_target.dtype
    aux: dict[str, jax.Array] = {}
    new_state = state
    if loss.name == "arcface":
        target = arcface_target(c_target, loss.m, loss.arcface_variant)
    elif loss.name == "cosface":
        target = cosface_target(c_target, loss.m)
    elif loss.name == "combined":
        target = combined_target(c_target, loss.m1, loss.m2, loss.m3, loss.combined_variant)
    elif loss.name == "magface":
        a = magface_magnitude(norms.astype(dtype), loss.l_a, loss.u_a)
        margin = magface_margin(a, loss.l_a, loss.u_a, loss.l_m, loss.u_m)
        target = magface_target(c_target, margin, loss.easy_margin)
        aux["magface_g"] = magface_regularizer(a, loss.u_a)
        aux["margin"] = margin
    elif loss.name == "adaface":
        safe_norms = clamp(lax.stop_gradient(norms.astype(dtype)), 0.001, 100.0)
        new_state = adaface_update_state(safe_norms, state, loss.t_alpha, row_mask)
        scaler = adaface_margin_scaler(safe_norms, new_state, loss.h, loss.adaface_eps)
        target = adaface_target(c_target, scaler, loss.m, loss.adaface_eps)
        aux["margin_scaler"] = scaler
    else:
        raise ValueError(f"unknown loss {loss.name!r}")
    return target, aux, new_state


def non_target_logits(cos: jax.Array, loss: MarginLoss) -> jax.Array:
    """``s · clamp(c, ±bound)`` for the non-target entries, elementwise.

    With ``interclass_filtering_threshold > 0``, arcface_torch's inter-class filtering: cosines
    above the threshold become 0 with no gradient. Officially only samples whose label lives on
    the same GPU are filtered; here every sample is (the official result on one GPU; padded
    samples are filtered too, which changes nothing as they are masked out of the loss).
    """
    bound = loss.cosine_bound
    cos = clamp(cos, -bound, bound)
    if loss.interclass_filtering_threshold > 0:
        cos = jnp.where(cos > loss.interclass_filtering_threshold, 0.0, cos)
    return loss.s * cos


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
    ``z = non_target_logits(cos, loss)``.

    Autodiff would keep the exponentials and the masks inside ``non_target_logits`` as ``[C, B]``
    residuals, each written to memory in the forward pass and read back in the backward one.
    Here the one residual is the exponentials, negated where the logit passes no gradient (a
    clamped or filtered cosine: the slope of ``z`` is ``s`` or 0), so that the cosines are not
    kept for the backward pass, which forms the cosine gradient ``grad_i · s · max(e_ji, 0)``
    from that array alone. ``shift`` (stopped, as in every log-sum-exp) gets no gradient.
    """
    return _shifted_exp(non_target_logits(cos, loss), labels, class_mask, shift).sum(axis=0)


def _shifted_exp(logits, labels, class_mask, shift):
    """``exp(z - shift)`` at the non-target entries, 0 elsewhere (the mask inside the exponent
    keeps it one elementwise pass)."""
    keep = _non_target(labels, class_mask, logits.shape[0])
    return jnp.exp(jnp.where(keep, logits - shift, -jnp.inf))


def _sum_exp_forward(loss, cos, labels, class_mask, shift):
    logits, slope = jax.jvp(functools.partial(non_target_logits, loss=loss), (cos,),
                            (jnp.ones_like(cos),))
    # The barrier stores the signed array itself; without it XLA stores the exponentials and
    # recomputes the sign from the cosines in the backward pass, keeping them alive.
    signed_exp = lax.optimization_barrier(
        jnp.where(slope != 0, 1.0, -1.0) * _shifted_exp(logits, labels, class_mask, shift))
    return jnp.abs(signed_exp).sum(axis=0), (signed_exp, shift)


def _sum_exp_backward(loss, residuals, grad):
    signed_exp, shift = residuals
    return (grad * loss.s) * jnp.maximum(signed_exp, 0.0), None, None, jnp.zeros_like(shift)


_sum_exp_over_classes.defvjp(_sum_exp_forward, _sum_exp_backward)


def _lowest_shift(loss: MarginLoss, dtype: Any) -> float | None:
    """``c0 = s · bound - K``, the log-sum-exp shift's floor, or None if ``dtype`` has no room.

    With the shift ``max(target_i, c0)``, each term ``exp(z - shift)`` is at most ``e^K`` (every
    non-target logit is at most ``s · bound``), so up to 2^31 classes sum below the dtype's max;
    and the largest term is at least ``e^(K - 2 s · bound)`` (non-target logits are at least
    ``-s · bound``), kept 7 e-folds above the smallest normal number.
    """
    info = jnp.finfo(dtype)
    headroom = math.log(info.max) - 31 * math.log(2) - 1  # K
    top = loss.s * loss.cosine_bound
    if headroom < 2 * top + math.log(info.tiny) + 7:
        return None
    return top - headroom


def margin_cross_entropy(
    cos: jax.Array,
    labels: jax.Array,
    target_logit: jax.Array,
    loss: MarginLoss,
    *,
    mask: jax.Array | None = None,
    class_mask: jax.Array | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """Mean over samples of ``-log softmax(z_·i)[y_i]``, in the cosines' (float32+) dtype.

    The logits are :func:`non_target_logits` of ``cos`` for every class but the target, whose
    logit is ``target_logit_i``. ``cos`` is class-major ``[C, B]``; ``labels`` ``[B]`` index its
    rows, and a label outside ``[0, C)`` marks a sample whose class is not in this block (a
    shard that does not own it), where ``target_logit`` is ignored. The ``[C, B]`` logits are
    never stored (their exponentials are, once): they are computed from ``cos`` where needed.

    The log-sum-exp is shifted by ``max(target_logit_i, c0)`` with a constant ``c0`` (see
    :func:`_lowest_shift`) rather than by the largest logit: no pass over ``[C, B]`` for a max,
    and the same accuracy (the loss is ``log Σ`` when the target dominates, else a sum of two
    positive terms). Scales too large for the dtype (float32: ``s > 73``) fall back to
    ``s · clamp(max_j c_ji)``.

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
    lowest_shift = _lowest_shift(loss, cos.dtype)
    if lowest_shift is None:
        bound = loss.cosine_bound
        lowest_shift = loss.s * clamp(lax.stop_gradient(cos).max(axis=0), -bound, bound)
    shift = jnp.maximum(lax.stop_gradient(target_logit), lowest_shift)
    if axis_name is not None:
        shift = lax.pmax(shift, axis_name)
    sum_exp = (_sum_exp_over_classes(loss, cos, labels, class_mask, shift)
               + jnp.exp(target_logit - shift))
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
    """Total loss of one block of classes: cross entropy (+ ``λ_g · mean g(a)`` for MagFace).

    Args:
      cos: raw class-major cosines ``[C_block, B]`` (clamped as the loss's official code does).
      target_cos: ``cos[labels_i, i]`` ``[B]`` (any value where the block does not hold it), as
        :func:`cosine_similarity` returns it.
      labels: ``[B]`` each sample's class within this block, outside ``[0, C_block)`` when the
        block does not hold it.
      norms, loss, state, row_mask: as :func:`margin_targets`.
      class_mask: the real (not padding) classes ``[C_block]``, or None.
      axis_name: the mesh axis the classes are sharded over (see
        :func:`margin_cross_entropy`); ``cos``, ``norms`` and ``row_mask`` then cover the global
        batch on every shard.

    Returns:
      ``(loss, metrics, new_state)`` where ``metrics`` has ``loss_ce``, for MagFace ``loss_g``
      (the mean of ``g(a)``, before ``λ_g``), and this block's class-major ``logits``
      ``[C_block, B]``, ``s · (c with the margin on the target)`` (dropped by jit when unused).
    """
    c_target = clamp(target_cos, -loss.cosine_bound, loss.cosine_bound)
    target, aux, new_state = margin_targets(c_target, norms, loss, state, row_mask=row_mask)
    loss_ce = margin_cross_entropy(cos, labels, loss.s * target, loss, mask=row_mask,
                                   class_mask=class_mask, axis_name=axis_name)
    non_target = _non_target(labels, None, cos.shape[0])
    logits = jnp.where(non_target, non_target_logits(cos, loss), loss.s * target)
    metrics = {"loss_ce": loss_ce, "logits": logits}
    total = loss_ce
    if "magface_g" in aux:
        loss_g = masked_mean(aux["magface_g"], row_mask)
        metrics["loss_g"] = loss_g
        total = total + loss.lambda_g * loss_g
    return total, metrics, new_state


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


def value_and_grads(
    embeddings: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    loss: MarginLoss,
    state: dict | None = None,
) -> dict[str, Any]:
    """:func:`dense_loss` and its gradients, in the field names of the reference files.

    Returns ``logits`` (``[B, C]``), ``loss``, ``loss_ce``, ``loss_g`` (MagFace),
    ``grad_embeddings``, ``grad_weight`` and ``state_after``.
    """

    def total(embeddings, weight):
        value, metrics, new_state = dense_loss(embeddings, weight, labels, loss, state)
        return value, (metrics, new_state)

    (value, (metrics, new_state)), (grad_x, grad_w) = jax.value_and_grad(
        total, argnums=(0, 1), has_aux=True
    )(embeddings, weight)
    return {
        **metrics,
        "logits": metrics["logits"].T,
        "loss": value,
        "grad_embeddings": grad_x,
        "grad_weight": grad_w,
        "state_after": new_state,
    }
