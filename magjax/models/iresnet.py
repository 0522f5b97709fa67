"""iResNet backbones: arcface_torch's ``backbones/iresnet.py`` and MagFace's ``models/iresnet.py``.

Reimplemented from the architecture description (docs/official-losses.md section 5):

* stem: conv3x3(3->64, stride 1) -> BN -> PReLU;
* four stages of ``IBasicBlock`` (widths 64/128/256/512, each stage starts with stride 2, so
  112 -> 56 -> 28 -> 14 -> 7); a block is BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN
  plus the identity, or conv1x1(stride) + BN when the shape changes (no activation after the sum);
* head: BN2d -> dropout -> flatten -> Linear(512*7*7 -> 512) -> BatchNorm1d.

The two families differ only in:

=================  =====================================  =====================================
                   arcface_torch                          MagFace
=================  =====================================  =====================================
BN eps/momentum    1e-5 / 0.1 (PyTorch convention)        2e-5 / 0.9 (an MXNet-port artefact)
conv init          N(0, 0.1)                              kaiming normal (fan_out, relu)
dropout            element-wise after flatten, p=0.0      Dropout2d (whole channels), p=0.4
final BatchNorm1d  scale fixed to 1 and frozen            affine, trainable
=================  =====================================  =====================================

Both keep the Linear with PyTorch's default init. Submodule names mirror the PyTorch
``state_dict`` keys (``layer1.0.bn1`` -> ``layer1_0/bn1``) so ``magjax.convert`` maps one to the
other by rule.

Compute dtype: the trunk runs in ``dtype`` (e.g. bfloat16) with float32 parameters; the Linear
and the final BatchNorm run in float32, as arcface_torch does under fp16 autocast, so the raw
embedding (whose norm MagFace reads as quality) is float32.

BatchNorm under data parallelism: the train step runs this module under plain ``jax.jit`` with
the batch sharded on mesh axis ``data``; a call on the whole batch computes BatchNorm
statistics over the global batch (jax-stack.md section 2), as synchronised BatchNorm would, and
``magjax.models.apply_train`` gives each device's shard its own statistics (the official
trainers' behaviour). No ``axis_name`` is set, so do not call the backbone inside
``shard_map``.

``tiny`` is the same design shrunk for the CPU demo (stride-2 stem, one block per stage);
``magface_tiny`` is it in the MagFace family (trainable final BatchNorm scale, so that feature
magnitudes can spread: with arcface_torch's fixed scale their mean is pinned).

The archs (:data:`ARCHS`): ``iresnet18/34/50/100/200`` (arcface_torch), ``magface_iresnet18/34/
50/100`` (MagFace), ``tiny`` and ``magface_tiny`` (magjax's CPU-demo nets, no official
checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from magjax.models.arch import Arch, Layout
from magjax.models.layers import (
    KAIMING_FAN_OUT,
    TORCH_DEFAULT_KERNEL,
    PReLU,
    batch_norm,
    conv,
    flatten,
    torch_default_bias,
)

STAGE_BLOCKS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}

# Per-family settings (see the table in the module docstring).
_FAMILIES = {
    "arcface_torch": dict(
        eps=1e-5,
        torch_momentum=0.1,
        conv_init=nn.initializers.normal(0.1),
        channel_dropout=False,
        frozen_final_scale=True,
    ),
    "magface": dict(
        eps=2e-5,
        torch_momentum=0.9,
        conv_init=KAIMING_FAN_OUT,
        channel_dropout=True,
        frozen_final_scale=False,
    ),
}


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus identity or downsample."""

    planes: int
    stride: int
    downsample: bool
    family: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        cfg = _FAMILIES[self.family]

        def bn(name):
            return batch_norm(
                train,
                eps=cfg["eps"],
                torch_momentum=cfg["torch_momentum"],
                dtype=self.dtype,
                name=name,
            )

        def conv_layer(kernel, stride, padding, name):
            return conv(
                self.planes,
                kernel,
                stride=stride,
                padding=padding,
                kernel_init=cfg["conv_init"],
                dtype=self.dtype,
                name=name,
            )

        out = bn("bn1")(x)
        out = conv_layer(3, 1, 1, "conv1")(out)
        out = bn("bn2")(out)
        out = PReLU(dtype=self.dtype, name="prelu")(out)
        out = conv_layer(3, self.stride, 1, "conv2")(out)
        out = bn("bn3")(out)
        identity = x
        if self.downsample:
            identity = bn("downsample_1")(conv_layer(1, self.stride, 0, "downsample_0")(x))
        return out + identity


class IResNet(nn.Module):
    """iResNet returning the raw float32 embedding [B, embedding_dim] from NHWC images."""

    stage_blocks: Sequence[int]
    family: str = "arcface_torch"
    widths: Sequence[int] = (64, 128, 256, 512)
    stem_width: int = 64
    stem_stride: int = 1
    dropout: float = 0.0
    embedding_dim: int = 512
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        cfg = _FAMILIES[self.family]

        def bn(name, dtype, **kwargs):
            return batch_norm(
                train,
                eps=cfg["eps"],
                torch_momentum=cfg["torch_momentum"],
                dtype=dtype,
                name=name,
                **kwargs,
            )

        x = images.astype(self.dtype)
        x = conv(
            self.stem_width,
            3,
            stride=self.stem_stride,
            padding=1,
            kernel_init=cfg["conv_init"],
            dtype=self.dtype,
            name="conv1",
        )(x)
        x = bn("bn1", self.dtype)(x)
        x = PReLU(dtype=self.dtype, name="prelu")(x)

        in_planes = self.stem_width
        for stage, (planes, blocks) in enumerate(zip(self.widths, self.stage_blocks, strict=True)):
            for index in range(blocks):
                stride = 2 if index == 0 else 1
                x = IBasicBlock(
                    planes,
                    stride,
                    downsample=stride != 1 or in_planes != planes,
                    family=self.family,
                    dtype=self.dtype,
                    name=f"layer{stage + 1}_{index}",
                )(x, train=train)
                in_planes = planes

        x = bn("bn2", self.dtype)(x)
        if cfg["channel_dropout"]:
            # nn.Dropout2d on NCHW zeroes whole channels: broadcast the mask over H and W.
            x = nn.Dropout(self.dropout, broadcast_dims=(1, 2))(x, deterministic=not train)
            x = flatten(x)
        else:
            x = flatten(x)
            x = nn.Dropout(self.dropout)(x, deterministic=not train)

        # The head runs in float32 (arcface_torch calls fc on x.float() under autocast), or in
        # float64 for a float64 model (the float64 lockstep test against PyTorch).
        head_dtype = jnp.promote_types(self.dtype, jnp.float32)
        x = x.astype(head_dtype)
        x = nn.Dense(
            self.embedding_dim,
            kernel_init=TORCH_DEFAULT_KERNEL,
            bias_init=torch_default_bias(x.shape[-1]),
            name="fc",
        )(x)
        return bn("features", head_dtype, frozen_scale=cfg["frozen_final_scale"])(x)


# The demo nets: a stride-2 stem, then one block per stage, 112 -> 56 -> 28 -> 14 -> 7 -> 4 and a
# 4*4*64 head. Narrow because XLA's CPU convolution weight gradients at 56x56 and 28x28 dominate
# the step (BENCHMARKS.md); 0.6 M parameters.
TINY_STAGE_BLOCKS = (1, 1, 1, 1)
TINY_WIDTHS = (8, 16, 32, 64)


def onnx_graph(g, x: str) -> str:
    """The ONNX wiring (``magjax.export``'s graph builder ``g``) of the iresnets and demo nets."""
    x = g.prelu(g.conv_bn(x, "conv1", "bn1"), "prelu")
    stage = 1
    while g.has(f"layer{stage}.0.conv1"):
        block = 0
        while g.has(f"layer{stage}.{block}.conv1"):
            p = f"layer{stage}.{block}"
            out = g.conv_bn(g.batch_norm(x, f"{p}.bn1"), f"{p}.conv1", f"{p}.bn2")
            out = g.conv_bn(g.prelu(out, f"{p}.prelu"), f"{p}.conv2", f"{p}.bn3")
            if g.has(f"{p}.downsample.0"):
                x = g.conv_bn(x, f"{p}.downsample.0", f"{p}.downsample.1")
            x = g.add(out, x, f"{p}.add")
            block += 1
        stage += 1
    return g.linear_bn(g.batch_norm(x, "bn2"), "fc", "features")


LAYOUT = Layout(embedding_norm=("features",), onnx=onnx_graph, flattened_linear={"fc": "bn2"})


def _arch(name: str, family: str, stage_blocks, *, demo: bool = False) -> Arch:
    widths = dict(widths=TINY_WIDTHS, stem_width=TINY_WIDTHS[0], stem_stride=2) if demo else {}

    def build(*, dtype, dropout, embedding_dim):
        return IResNet(
            stage_blocks,
            family=family,
            dropout=dropout,
            embedding_dim=embedding_dim,
            dtype=dtype,
            **widths,
        )

    def torch_module(dropout):
        from magjax.models import torch_reference

        return torch_reference.IResNet(
            stage_blocks, family, dropout=dropout, spatial=4 if demo else 7, **widths
        )

    return Arch(
        name,
        family,
        build,
        LAYOUT,
        torch_module,
        default_dropout=0.0 if family == "arcface_torch" else 0.4,
        official=not demo,
        frozen=(("features", "scale"),) if family == "arcface_torch" else (),
    )


ARCHS = (
    *(_arch(f"iresnet{depth}", "arcface_torch", STAGE_BLOCKS[depth]) for depth in STAGE_BLOCKS),
    *(
        _arch(f"magface_iresnet{depth}", "magface", STAGE_BLOCKS[depth])
        for depth in (18, 34, 50, 100)
    ),
    _arch("tiny", "arcface_torch", TINY_STAGE_BLOCKS, demo=True),
    _arch("magface_tiny", "magface", TINY_STAGE_BLOCKS, demo=True),
)
