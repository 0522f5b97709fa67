"""MagFace (Meng et al., CVPR 2021): a margin that grows with the feature magnitude, and a
regulariser that pulls the magnitude up, so that the norm becomes a quality score.

Matches the official ``MagLinear`` + ``MagLoss`` (run/trainer.py): magnitude not detached, easy
margin by default, plain softmax cross entropy, ``λ_g · mean g(a)`` added.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from magjax.losses.base import Margin, MarginLoss, clamp, cos_add, masked_mean, register


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
    cos_theta_m = cos_add(c, margin)
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


@register
@dataclasses.dataclass(frozen=True)
class MagFace(MarginLoss):
    """Target ``s · cos(θ + m(a))`` with ``a = clamp(||x||, l_a, u_a)`` and ``m(a)`` linear from
    ``l_m`` to ``u_m``; loss ``CE + λ_g · mean g(a)``. Defaults: the MagFace run scripts."""

    name = "magface"
    progress_metrics = ("loss_g",)
    l_a: float = 10.0
    u_a: float = 110.0
    l_m: float = 0.45
    u_m: float = 0.8
    lambda_g: float = 35.0
    easy_margin: bool = True

    def margin(self, c_target, norms, state, row_mask) -> Margin:
        a = magface_magnitude(norms.astype(c_target.dtype), self.l_a, self.u_a)
        margin = magface_margin(a, self.l_a, self.u_a, self.l_m, self.u_m)
        loss_g = masked_mean(magface_regularizer(a, self.u_a), row_mask)
        penalty = self.lambda_g * loss_g
        return Margin(
            magface_target(c_target, margin, self.easy_margin),
            penalty=penalty,
            metrics={"loss_g": loss_g, "lambda_g_loss_g": penalty},
        )
