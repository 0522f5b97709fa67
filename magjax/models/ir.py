"""AdaFace's IR backbones (``net.py``, ``build_model('ir_50')`` etc.), reimplemented from
docs/official-losses.md section 5.3.

* stem ``input_layer``: conv3x3(3->64, stride 1) -> BN -> PReLU;
* ``body``: ``BasicBlockIR`` units (widths 64/128/256/512, first unit of each stage stride 2):
  BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus a shortcut that is
  ``MaxPool2d(1, stride)`` (a strided subsample, no parameters) when input and output channels
  are equal, else conv1x1(stride) + BN. So the first stage (64 -> 64) has no downsample
  parameters, unlike arcface_torch's iresnet;
* ``output_layer``: BN2d -> Dropout(0.4) -> flatten -> Linear(512*7*7 -> 512) ->
  BatchNorm1d(affine=False).

BatchNorm eps 1e-5, PyTorch momentum 0.1 (flax 0.9); kaiming-normal (fan_out) init for conv and
Linear, zero bias. The official module returns ``(x/|x|, |x|)``; this one returns the raw ``x``
(the norm is computed by the loss). Submodule names mirror the PyTorch keys
(``body.3.res_layer.1`` -> ``body_3/res_layer_1``). Compute dtype and BatchNorm under data
parallelism as in ``magjax.models.iresnet``: statistics as ``models.apply_train`` groups the
batch, float32 head.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from magjax.models.arch import Arch, Layout
from magjax.models.layers import KAIMING_FAN_OUT, PReLU, batch_norm, conv, flatten

STAGE_BLOCKS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),  # build_model('ir_101') builds num_layers=100
}
_EPS = 1e-5
_TORCH_MOMENTUM = 0.1


def _bn(train: bool, name: str, dtype, **kwargs) -> nn.BatchNorm:
    return batch_norm(
        train, eps=_EPS, torch_momentum=_TORCH_MOMENTUM, dtype=dtype, name=name, **kwargs
    )


class BasicBlockIR(nn.Module):
    """One IR unit; see the module docstring for the shortcut rule."""

    in_channels: int
    depth: int
    stride: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        def conv_layer(kernel, stride, padding, name):
            return conv(
                self.depth,
                kernel,
                stride=stride,
                padding=padding,
                kernel_init=KAIMING_FAN_OUT,
                dtype=self.dtype,
                name=name,
            )

        if self.in_channels == self.depth:
            shortcut = nn.max_pool(x, (1, 1), strides=(self.stride, self.stride))
        else:
            shortcut = conv_layer(1, self.stride, 0, "shortcut_layer_0")(x)
            shortcut = _bn(train, "shortcut_layer_1", self.dtype)(shortcut)

        res = _bn(train, "res_layer_0", self.dtype)(x)
        res = conv_layer(3, 1, 1, "res_layer_1")(res)
        res = _bn(train, "res_layer_2", self.dtype)(res)
        res = PReLU(dtype=self.dtype, name="res_layer_3")(res)
        res = conv_layer(3, self.stride, 1, "res_layer_4")(res)
        res = _bn(train, "res_layer_5", self.dtype)(res)
        return res + shortcut


class IRNet(nn.Module):
    """AdaFace ``Backbone(input_size=(112, 112), num_layers, mode='ir')``; raw float32 embedding."""

    stage_blocks: Sequence[int]
    dropout: float = 0.4
    embedding_dim: int = 512
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        x = images.astype(self.dtype)
        x = conv(
            64,
            3,
            stride=1,
            padding=1,
            kernel_init=KAIMING_FAN_OUT,
            dtype=self.dtype,
            name="input_layer_0",
        )(x)
        x = _bn(train, "input_layer_1", self.dtype)(x)
        x = PReLU(dtype=self.dtype, name="input_layer_2")(x)

        in_channels, unit = 64, 0
        for depth, blocks in zip((64, 128, 256, 512), self.stage_blocks, strict=True):
            for index in range(blocks):
                x = BasicBlockIR(
                    in_channels,
                    depth,
                    stride=2 if index == 0 else 1,
                    dtype=self.dtype,
                    name=f"body_{unit}",
                )(x, train=train)
                in_channels, unit = depth, unit + 1

        x = _bn(train, "output_layer_0", self.dtype)(x)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        head_dtype = jnp.promote_types(self.dtype, jnp.float32)  # as in magjax.models.iresnet
        x = flatten(x).astype(head_dtype)
        x = nn.Dense(
            self.embedding_dim,
            kernel_init=KAIMING_FAN_OUT,
            bias_init=nn.initializers.zeros,
            name="output_layer_3",
        )(x)
        return _bn(train, "output_layer_4", head_dtype, affine=False)(x)


def onnx_graph(g, x: str) -> str:
    """The ONNX wiring (``magjax.export``'s graph builder ``g``): units with a conv1x1+BN or a
    MaxPool2d(1, stride) shortcut."""
    x = g.prelu(g.conv_bn(x, "input_layer.0", "input_layer.1"), "input_layer.2")
    unit = 0
    while g.has_prefix(p := f"body.{unit}"):
        if g.has(f"{p}.shortcut_layer.0"):
            shortcut = g.conv_bn(x, f"{p}.shortcut_layer.0", f"{p}.shortcut_layer.1")
        elif (stride := g.settings[f"{p}.res_layer.4"]["strides"]) != [1, 1]:
            shortcut = g.node(
                "MaxPool", [x], f"{p}.shortcut_layer", kernel_shape=[1, 1], strides=stride
            )
        else:
            shortcut = x
        res = g.conv_bn(g.batch_norm(x, f"{p}.res_layer.0"), f"{p}.res_layer.1", f"{p}.res_layer.2")
        res = g.conv_bn(g.prelu(res, f"{p}.res_layer.3"), f"{p}.res_layer.4", f"{p}.res_layer.5")
        x = g.add(res, shortcut, f"{p}.add")
        unit += 1
    return g.linear_bn(g.batch_norm(x, "output_layer.0"), "output_layer.3", "output_layer.4")


LAYOUT = Layout(
    embedding_norm=("output_layer_4",),
    onnx=onnx_graph,
    flattened_linear={"output_layer.3": "output_layer.0"},
)


def _arch(depth: int) -> Arch:
    stage_blocks = STAGE_BLOCKS[100 if depth == 101 else depth]

    def build(*, dtype, dropout, embedding_dim):
        return IRNet(stage_blocks, dropout=dropout, embedding_dim=embedding_dim, dtype=dtype)

    def torch_module(dropout):
        from magjax.models import torch_reference

        return torch_reference.IRNet(stage_blocks, dropout)

    return Arch(f"ir_{depth}", "adaface", build, LAYOUT, torch_module, default_dropout=0.4)


ARCHS = tuple(_arch(depth) for depth in (18, 34, 50, 101))
