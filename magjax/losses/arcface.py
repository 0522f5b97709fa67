"""ArcFace, CosFace and the combined margin, as insightface ``arcface_torch`` trains them.

All three are arcface_torch's ``CombinedMarginLoss`` family: the margin changes only the target
cosine, the cross entropy is ``DistCrossEntropy`` (target probability floored at 1e-30, loss
capped at 69.0776, gradient uncapped), and ``interclass_filtering_threshold > 0`` zeroes
non-target cosines above it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from magjax.losses.base import Margin, MarginLoss, clamp, cos_add, register

# arcface_torch's DistCrossEntropy floors the target probability at 1e-30 (loss cap 69.0776).
INSIGHTFACE_PROBABILITY_FLOOR = 1e-30
ARCFACE_VARIANTS = ("insightface", "paper", "classic", "easy")
COMBINED_VARIANTS = ("insightface", "paper")


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
        return cos_add(c, m)
    if variant == "classic":
        return jnp.where(c > math.cos(math.pi - m), cos_add(c, m), c - m * math.sin(m))
    if variant == "easy":
        return jnp.where(c > 0, cos_add(c, m), c)
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


@dataclasses.dataclass(frozen=True)
class ArcfaceTorchLoss(MarginLoss):
    """What the arcface_torch losses share: DistCrossEntropy's floor and inter-class filtering
    (``CombinedMarginLoss(interclass_filtering_threshold)``; 0 is off)."""

    probability_floor: float | None = INSIGHTFACE_PROBABILITY_FLOOR
    interclass_filtering_threshold: float = 0.0

    def non_target_logits(self, cos: jax.Array, context: None) -> jax.Array:
        """``s · clamp(c, ±1)``; with filtering, cosines above the threshold become 0 with no
        gradient. Officially only samples whose label lives on the same GPU are filtered; here
        every sample is (the official result on one GPU; padded samples are filtered too, which
        changes nothing as they are masked out of the loss)."""
        cos = clamp(cos, -1.0, 1.0)
        if self.interclass_filtering_threshold > 0:
            cos = jnp.where(cos > self.interclass_filtering_threshold, 0.0, cos)
        return self.s * cos


@register
@dataclasses.dataclass(frozen=True)
class ArcFace(ArcfaceTorchLoss):
    """ArcFace (Deng et al., CVPR 2019): target logit ``s · cos(θ + m)``, :func:`arcface_target`
    (``variant="insightface"``: arcface_torch's straight-through gradient)."""

    name = "arcface"
    m: float = 0.5
    variant: str = "insightface"

    def margin(self, c_target, norms, state, row_mask) -> Margin:
        return Margin(arcface_target(c_target, self.m, self.variant))


@register
@dataclasses.dataclass(frozen=True)
class CosFace(ArcfaceTorchLoss):
    """CosFace (Wang et al., CVPR 2018): target logit ``s · (c - m)``."""

    name = "cosface"
    m: float = 0.4

    def margin(self, c_target, norms, state, row_mask) -> Margin:
        return Margin(cosface_target(c_target, self.m))


@register
@dataclasses.dataclass(frozen=True)
class Combined(ArcfaceTorchLoss):
    """The combined margin ``s · (cos(m1 θ + m2) - m3)``, :func:`combined_target`."""

    name = "combined"
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    variant: str = "insightface"

    def margin(self, c_target, norms, state, row_mask) -> Margin:
        return Margin(combined_target(c_target, self.m1, self.m2, self.m3, self.variant))
