"""Building blocks shared by the backbones: PyTorch-compatible layers and initialisers.

Every layer here reproduces the PyTorch layer the official repositories use, with the
differences in conventions made explicit:

* BatchNorm momentum: PyTorch's ``momentum`` is the weight of the *new* batch statistic,
  flax's is the weight of the *old* running value, so ``flax_momentum = 1 - torch_momentum``
  (:func:`batch_norm` takes the PyTorch value to keep the official numbers visible).
* Padding: PyTorch pads symmetrically (``padding=1`` on a 3x3 kernel); flax's ``"SAME"`` pads
  ``(0, 1)`` for stride 2 on an even input, which would shift every strided feature map, so all
  convolutions take explicit padding.
* Initialisers are written against PyTorch's definitions (fan computed from the kernel as
  PyTorch does; for HWIO kernels jax's ``variance_scaling`` computes the same fans).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes, normalization

Dtype = Any

# kaiming_normal_(mode="fan_out", nonlinearity="relu"): N(0, 2 / fan_out), not truncated.
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default Linear/Conv weight init, kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in)).
TORCH_DEFAULT_KERNEL = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default Linear bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv(
    features: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    kernel_init: nn.initializers.Initializer,
    dtype: Dtype,
    name: str,
) -> nn.Conv:
    """A bias-free ``torch.nn.Conv2d`` equivalent (NHWC, HWIO kernel, symmetric padding)."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        feature_group_count=groups,
        use_bias=False,
        kernel_init=kernel_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize_with_batch_statistics(x, scale, bias, epsilon, stats_dtype):
    """Training-mode BatchNorm over every axis but the last; returns ``(y, mean, var)``.

    ``mean = E[x]`` and ``var = E[(x - mean)^2]`` (two passes, as PyTorch) in ``stats_dtype``,
    ``y = (x - mean) * (rsqrt(var + epsilon) * scale) + bias``: flax's ``_compute_stats`` and
    ``_normalize`` op for op, so that ``y`` is bit-identical to ``flax.linen.BatchNorm``'s.

    Written by hand for its gradient. With ``n`` values per feature, ``rstd = rsqrt(var +
    epsilon)`` and ``xhat = (x - mean) * rstd``: ``dbias = sum(dy)``, ``dscale = sum(dy * xhat)``,
    ``dx = scale * rstd * (dy - dbias / n - xhat * dscale / n) + dmean / n
    + 2 * dvar * (x - mean) / n``. Forward and backward then take four reductions and three
    element-wise passes over the activations as XLA:CPU compiles them, autodiff of the forward
    six and four (BENCHMARKS.md, "BatchNorm's gradient by hand").
    """
    return _batch_norm_forward(x, scale, bias, epsilon, stats_dtype)[0]


def _batch_norm_forward(x, scale, bias, epsilon, stats_dtype):
    axes = tuple(range(x.ndim - 1))
    x_stats = x.astype(stats_dtype)
    mean = x_stats.mean(axes)
    var = jax.lax.square(x_stats - mean).mean(axes)
    rstd = jax.lax.rsqrt(var + epsilon)
    y = (x - mean) * (rstd * scale) + bias
    return (y, mean, var), (x, mean, rstd, scale, bias)  # bias: for its dtype only


def _batch_norm_backward(epsilon, stats_dtype, residuals, cotangents):
    del epsilon, stats_dtype  # in rstd
    x, mean, rstd, scale, bias = residuals
    dy, dmean, dvar = cotangents
    dtype = jnp.result_type(x, mean, scale, bias)
    axes = tuple(range(x.ndim - 1))
    n = math.prod(x.shape[:-1])
    dy = dy.astype(dtype)
    centred = x.astype(dtype) - mean
    xhat = centred * rstd
    dbias = dy.sum(axes)
    dscale = (dy * xhat).sum(axes)
    dx = (scale * rstd) * (dy - dbias / n - xhat * (dscale / n)) + (dmean + 2 * dvar * centred) / n
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


normalize_with_batch_statistics.defvjp(_batch_norm_forward, _batch_norm_backward)


class BatchNorm(nn.BatchNorm):
    """``flax.linen.BatchNorm`` whose running variance is PyTorch's: updated with the unbiased
    batch variance ``n / (n - 1) * var`` (``n`` values per feature), while training-mode
    normalisation uses the biased one as both frameworks do.

    Only what this project uses is supported: features on the last axis, no ``axis_name``, no
    ``mask``, two-pass variance (``use_fast_variance`` is not read). Evaluation mode is flax's
    own ``_normalize`` (private, for the pinned flax version); training mode is
    :func:`normalize_with_batch_statistics`, the same forward with a hand-written gradient.
    Parameters and statistics have flax's names and shapes.
    """

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if use_running_average:
            return normalization._normalize(
                self,
                x,
                ra_mean.value,
                ra_var.value,
                tuple(range(x.ndim - 1)),
                (x.ndim - 1,),
                self.dtype,
                self.param_dtype,
                self.epsilon,
                self.use_bias,
                self.use_scale,
                self.bias_init,
                self.scale_init,
            )
        scale = (
            self.param("scale", self.scale_init, (features,), self.param_dtype)
            if self.use_scale
            else None
        )
        bias = (
            self.param("bias", self.bias_init, (features,), self.param_dtype)
            if self.use_bias
            else None
        )
        stats_dtype = jnp.promote_types(self.dtype or x.dtype, jnp.float32)  # as flax
        y, mean, var = normalize_with_batch_statistics(
            x,
            jnp.ones(features, stats_dtype) if scale is None else scale,  # exact: * 1 and + 0
            jnp.zeros(features, stats_dtype) if bias is None else bias,
            self.epsilon,
            stats_dtype,
        )
        if not self.is_initializing():
            n = math.prod(x.shape[:-1])
            unbiased = var * (n / max(n - 1, 1))
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
        affine = [p for p in (scale, bias) if p is not None]
        return y.astype(dtypes.canonicalize_dtype(x, *affine, dtype=self.dtype))


class FrozenScaleBatchNorm(BatchNorm):
    """BatchNorm whose ``scale`` stays a parameter but never receives a gradient.

    arcface_torch fixes the final ``BatchNorm1d`` weight to 1 and sets ``requires_grad=False``.
    Here the parameter exists (it is counted and loaded from ``features.weight``) and is read
    through ``stop_gradient``, so its gradient is exactly zero. An optimiser that adds weight
    decay outside the gradient must still skip it: see ``magjax.models.trainable_mask``.
    """

    def param(self, name, init_fn, *args, **kwargs):
        value = super().param(name, init_fn, *args, **kwargs)
        return jax.lax.stop_gradient(value) if name == "scale" else value


def batch_norm(
    train: bool,
    *,
    eps: float,
    torch_momentum: float,
    dtype: Dtype,
    name: str,
    affine: bool = True,
    frozen_scale: bool = False,
) -> BatchNorm:
    """``torch.nn.BatchNorm{1,2}d(eps, momentum=torch_momentum, affine)`` over the last axis.

    Training mode normalises with the statistics of the batch the module sees; under plain
    ``jax.jit`` with the batch sharded over devices, that is the global batch (XLA inserts the
    cross-device reduction), so no ``axis_name`` is used.

    The batch variance is computed in two passes like PyTorch (flax's default single pass
    E[x^2] - E[x]^2 loses precision when |mean| >> std; no measurable cost on the CPU demo),
    and the running variance is updated with the unbiased estimate as PyTorch does
    (:class:`BatchNorm`).
    """
    cls = FrozenScaleBatchNorm if frozen_scale else BatchNorm
    return cls(
        use_running_average=not train,
        momentum=1.0 - torch_momentum,
        epsilon=eps,
        use_scale=affine,
        use_bias=affine,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class PReLU(nn.Module):
    """``torch.nn.PReLU(num_parameters=C)``: one slope per channel (last axis), initialised 0.25.

    Written by hand because ``flax.linen.PReLU`` has a single shared slope.
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        slope = self.param("weight", nn.initializers.constant(0.25), (x.shape[-1],), jnp.float32)
        x = x.astype(self.dtype)
        return jnp.where(x >= 0, x, slope.astype(self.dtype) * x)


def flatten(x: jax.Array) -> jax.Array:
    """Flattens NHWC feature maps to [B, H*W*C] (PyTorch flattens NCHW as C*H*W: the converter
    permutes the following Linear's input rows, so no transpose is needed at run time)."""
    return x.reshape(x.shape[0], -1)
