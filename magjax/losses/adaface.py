"""AdaFace (Kim et al., CVPR 2022): a margin adapted to image quality, read from the feature
norm's position in the batch (EMA statistics carried as loss state).

Matches the official head (head.py, ``AdaFace``): cosines clamped to ``±(1 - eps)``, the norm
detached and clipped to [0.001, 100], the EMA of its mean and unbiased std updated before use.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from magjax.losses.base import Margin, MarginLoss, clamp, register

# The official head's initial EMA buffers (batch_mean = 20, batch_std = 100).
INITIAL_STATE = {"batch_mean": 20.0, "batch_std": 100.0}


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


@register
@dataclasses.dataclass(frozen=True)
class AdaFace(MarginLoss):
    """Target ``s · (cos(clip(θ - m ẑ)) - m (1 + ẑ))`` with ``ẑ`` the clipped, standardised
    norm; state ``batch_mean``/``batch_std``. Defaults: the AdaFace run scripts."""

    name = "adaface"
    progress_metrics = ("adaface_batch_mean", "adaface_batch_std")
    m: float = 0.4
    h: float = 0.333
    t_alpha: float = 0.01
    eps: float = 1e-3

    @property
    def cosine_bound(self) -> float:
        return 1.0 - self.eps

    def initial_state(self) -> dict:
        return dict(INITIAL_STATE)

    def margin(self, c_target, norms, state, row_mask) -> Margin:
        safe_norms = clamp(lax.stop_gradient(norms.astype(c_target.dtype)), 0.001, 100.0)
        new_state = adaface_update_state(safe_norms, state, self.t_alpha, row_mask)
        scaler = adaface_margin_scaler(safe_norms, new_state, self.h, self.eps)
        return Margin(
            adaface_target(c_target, scaler, self.m, self.eps),
            state=new_state,
            metrics={f"adaface_{k}": v for k, v in new_state.items()},
        )
