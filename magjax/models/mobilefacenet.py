"""MobileFaceNet as arcface_torch's ``mbf`` (``get_mbf(fp16, num_features, blocks=(1, 4, 6, 2),
scale=2)``), reimplemented from its structure:

* ``ConvBlock`` = conv (no bias) -> BN -> PReLU; ``LinearBlock`` = conv (no bias) -> BN;
* ``DepthWise(in, out, groups=g, stride)`` = ConvBlock 1x1 (in -> g) -> ConvBlock 3x3 depthwise
  (g groups, stride) -> LinearBlock 1x1 (g -> out), plus the input when ``residual``;
* ``Residual(c, n, groups=g)`` = n residual ``DepthWise(c, c, groups=g, stride 1)``;
* trunk (scale 2, so 64*scale = 128): ConvBlock 3x3 s2 (3 -> 128); ConvBlock 3x3 (128 -> 128,
  groups 64) [blocks[0] == 1]; DepthWise(128 -> 128, g 128, s2); Residual(128, 4, g 128);
  DepthWise(128 -> 256, g 256, s2); Residual(256, 6, g 256); DepthWise(256 -> 256, g 512, s2);
  Residual(256, 2, g 256); ``conv_sep`` ConvBlock 1x1 (256 -> 512);
* ``features`` (GDC): LinearBlock 7x7 depthwise (512 groups, valid) -> flatten ->
  Linear(512 -> 512, no bias) -> BatchNorm1d (affine, trainable).

BatchNorm eps 1e-5, PyTorch momentum 0.1; kaiming normal (fan_out) for conv and Linear.
112 -> 56 -> 28 -> 14 -> 7 -> 1. 2,059,520 parameters. Submodule names mirror the PyTorch keys
(``layers.3.layers.0.layers.1`` -> ``layers_3/layers_0/layers_1``). The trunk runs in ``dtype``,
``conv_sep`` and ``features`` in float32 as under arcface_torch's autocast. No dropout.
BatchNorm under data parallelism as in ``magjax.models.iresnet``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from magjax.models.arch import Arch, Layout
from magjax.models.layers import KAIMING_FAN_OUT, PReLU, batch_norm, conv, flatten


def _bn(train: bool, name: str, dtype) -> nn.BatchNorm:
    return batch_norm(train, eps=1e-5, torch_momentum=0.1, dtype=dtype, name=name)


class ConvBlock(nn.Module):
    """conv -> BN (-> PReLU unless ``linear``), names ``layers_0/1/2`` as in the Sequential."""

    features: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    groups: int = 1
    linear: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = x.astype(self.dtype)
        x = conv(
            self.features,
            self.kernel,
            stride=self.stride,
            padding=self.padding,
            groups=self.groups,
            kernel_init=KAIMING_FAN_OUT,
            dtype=self.dtype,
            name="layers_0",
        )(x)
        x = _bn(train, "layers_1", self.dtype)(x)
        if not self.linear:
            x = PReLU(dtype=self.dtype, name="layers_2")(x)
        return x


class DepthWise(nn.Module):
    """Inverted-bottleneck unit: 1x1 expand to ``groups``, 3x3 depthwise, 1x1 linear project."""

    features: int
    groups: int
    stride: int
    residual: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        out = ConvBlock(self.groups, dtype=self.dtype, name="layers_0")(x, train=train)
        out = ConvBlock(
            self.groups, 3, self.stride, 1, groups=self.groups, dtype=self.dtype, name="layers_1"
        )(out, train=train)
        out = ConvBlock(self.features, linear=True, dtype=self.dtype, name="layers_2")(
            out, train=train
        )
        return x + out if self.residual else out


class Residual(nn.Module):
    """``num_blocks`` residual DepthWise units at constant width."""

    features: int
    num_blocks: int
    groups: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for index in range(self.num_blocks):
            x = DepthWise(
                self.features,
                self.groups,
                1,
                residual=True,
                dtype=self.dtype,
                name=f"layers_{index}",
            )(x, train=train)
        return x


class GDC(nn.Module):
    """Global depthwise conv head: 7x7 depthwise LinearBlock -> Linear (no bias) -> BN1d."""

    embedding_dim: int

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = ConvBlock(
            x.shape[-1], 7, groups=x.shape[-1], linear=True, dtype=jnp.float32, name="layers_0"
        )(x, train=train)
        x = nn.Dense(
            self.embedding_dim, use_bias=False, kernel_init=KAIMING_FAN_OUT, name="layers_2"
        )(flatten(x))
        return _bn(train, "layers_3", jnp.float32)(x)


class MobileFaceNet(nn.Module):
    """arcface_torch ``MobileFaceNet``; raw float32 embedding [B, embedding_dim]."""

    blocks: Sequence[int] = (1, 4, 6, 2)
    scale: int = 2
    embedding_dim: int = 512
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        c1, c2 = 64 * self.scale, 128 * self.scale
        dt = self.dtype
        x = ConvBlock(c1, 3, 2, 1, dtype=dt, name="layers_0")(images, train=train)
        if self.blocks[0] == 1:
            x = ConvBlock(c1, 3, 1, 1, groups=64, dtype=dt, name="layers_1")(x, train=train)
        else:
            x = Residual(c1, self.blocks[0], 128, dtype=dt, name="layers_1")(x, train=train)
        x = DepthWise(c1, 128, 2, dtype=dt, name="layers_2")(x, train=train)
        x = Residual(c1, self.blocks[1], 128, dtype=dt, name="layers_3")(x, train=train)
        x = DepthWise(c2, 256, 2, dtype=dt, name="layers_4")(x, train=train)
        x = Residual(c2, self.blocks[2], 256, dtype=dt, name="layers_5")(x, train=train)
        x = DepthWise(c2, 512, 2, dtype=dt, name="layers_6")(x, train=train)
        x = Residual(c2, self.blocks[3], 256, dtype=dt, name="layers_7")(x, train=train)
        x = ConvBlock(512, dtype=jnp.float32, name="conv_sep")(x, train=train)
        return GDC(self.embedding_dim, name="features")(x, train=train)


def onnx_graph(g, x: str) -> str:
    """The ONNX wiring (``magjax.export``'s graph builder ``g``): ConvBlock / DepthWise /
    Residual stages, conv_sep, GDC head."""

    def conv_block(x, p):  # conv -> BN (-> PReLU), a Sequential under p.layers
        x = g.conv_bn(x, f"{p}.layers.0", f"{p}.layers.1")
        return g.prelu(x, f"{p}.layers.2") if g.has(f"{p}.layers.2") else x

    def depthwise(x, p, residual):  # three ConvBlocks under p.layers
        out = x
        for index in range(3):
            out = conv_block(out, f"{p}.layers.{index}")
        return g.add(x, out, f"{p}.add") if residual else out

    stage = 0
    while g.has_prefix(p := f"layers.{stage}"):
        if g.has(f"{p}.layers.0"):
            x = conv_block(x, p)
        elif g.has(f"{p}.layers.0.layers.0"):
            x = depthwise(x, p, residual=False)
        else:  # Residual: DepthWise units under p.layers
            unit = 0
            while g.has_prefix(f"{p}.layers.{unit}"):
                x = depthwise(x, f"{p}.layers.{unit}", residual=True)
                unit += 1
        stage += 1
    x = conv_block(x, "conv_sep")
    x = conv_block(x, "features.layers.0")
    return g.linear_bn(x, "features.layers.2", "features.layers.3")


def _build(*, dtype, dropout, embedding_dim):
    del dropout  # mbf has no dropout layer (the registry refuses a non-zero rate)
    return MobileFaceNet(embedding_dim=embedding_dim, dtype=dtype)


def _torch_module(dropout):
    del dropout
    from magjax.models import torch_reference

    return torch_reference.MobileFaceNet()


ARCHS = (
    Arch(
        "mbf",
        "arcface_torch",
        _build,
        Layout(embedding_norm=("features", "layers_3"), onnx=onnx_graph),
        _torch_module,
        default_dropout=None,
    ),
)
