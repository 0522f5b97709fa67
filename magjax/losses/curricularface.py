"""CurricularFace (Huang et al., CVPR 2020): ArcFace's margin on the target, and hard
non-target cosines re-weighted by an adaptive ``t`` so that hard examples count more as
training advances (a curriculum).

Matches the authors' ``head/metrics.py`` ``CurricularFace`` with ``CrossEntropyLoss``
(HuangYG123/CurricularFace, ``train.py``):

* cosines clamped to ``[-1, 1]``; target ``cos(θ + m)`` while ``c_y > cos(π - m)``, else the
  fallback ``c_y - m sin m`` (``sin(π - m) · m``); exact gradient of the branch taken;
* ``t ← α · mean_i c_{i,y_i} + (1 - α) t`` (``α = 0.01``, clamped target cosines before the
  margin, no gradient), updated *before* the logits of the same step use it;
* a non-target ``c_j`` is hard when ``c_j > cos(θ_y + m)``, the raw value (also in rows that take
  the fallback); its logit is ``s · c_j (t + c_j)`` (gradient ``s (t + 2 c_j)``), else
  ``s · c_j``. The hard test and ``t`` pass no gradient.

The authors' head runs per GPU under DDP with a full copy of the classes; ``t`` is then each
GPU's own. magjax averages the target cosines over the global batch, so ``t`` is the same on
every device (on one GPU, the official value).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from magjax.losses.base import Margin, MarginLoss, clamp, cos_add, masked_mean, register


@register
@dataclasses.dataclass(frozen=True)
class CurricularFace(MarginLoss):
    """Defaults: the authors' code (``s`` 64, ``m`` 0.5, ``t`` momentum 0.01 hard-coded there)."""

    name = "curricularface"
    progress_metrics = ("curricularface_t",)
    # Non-target logits are s · c (t + c) on hard entries: not the s · clamp(c) the cross
    # entropy's lean backward pass assumes, so plain autodiff is used there.
    elementwise_scaled_non_target = False

    m: float = 0.5
    t_alpha: float = 0.01

    @property
    def max_logit(self) -> float:
        # |c (t + c)| <= 2 for |c| <= 1 and |t| <= 1 (t is an average of cosines).
        return 2.0 * self.s

    def initial_state(self) -> dict:
        return {"t": 0.0}

    def margin(self, c_target, norms, state, row_mask) -> Margin:
        t = lax.stop_gradient(
            self.t_alpha * masked_mean(c_target, row_mask) + (1.0 - self.t_alpha) * state["t"]
        )
        cos_theta_m = cos_add(c_target, self.m)
        target = jnp.where(
            c_target > math.cos(math.pi - self.m), cos_theta_m, c_target - self.m * math.sin(self.m)
        )
        context = {"threshold": lax.stop_gradient(cos_theta_m), "t": t}
        return Margin(target, context=context, state={"t": t}, metrics={"curricularface_t": t})

    def non_target_logits(self, cos: jax.Array, context: dict) -> jax.Array:
        """``s · c (t + c)`` where ``c > cos(θ_y + m)`` of the sample (column), else ``s · c``."""
        cos = clamp(cos, -1.0, 1.0)
        hard = cos > context["threshold"][None, :]
        return self.s * jnp.where(hard, cos * (context["t"] + cos), cos)
