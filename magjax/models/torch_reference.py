"""PyTorch definitions of the magjax architectures with the official ``state_dict`` key layouts.

Written from the architecture descriptions (docs/official-losses.md section 5 and the
``mbf`` structure in ``magjax.models.mobilefacenet``), not copied from the official code; each
family module's ``Arch.torch`` builds them (the ViT's is ``magjax.models.vit_torch``). They
serve two purposes: the PyTorch side of ``python -m magjax.bench backbone``, and the checkpoints
the conversion parity tests write in each family's layout. Importing this module needs torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from magjax import models


def _bn2d(channels: int, eps: float, momentum: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=eps, momentum=momentum)


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus identity or downsample."""

    def __init__(self, inplanes: int, planes: int, stride: int, eps: float, momentum: float):
        super().__init__()
        self.bn1 = _bn2d(inplanes, eps, momentum)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = _bn2d(planes, eps, momentum)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = _bn2d(planes, eps, momentum)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), _bn2d(planes, eps, momentum)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """arcface_torch (``family="arcface_torch"``) or MagFace (``"magface"``) iResNet."""

    def __init__(
        self,
        stage_blocks: Sequence[int],
        family: str = "arcface_torch",
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        stem_stride: int = 1,
        dropout: float = 0.0,
        embedding_dim: int = 512,
        spatial: int = 7,
    ):
        super().__init__()
        eps, momentum = (1e-5, 0.1) if family == "arcface_torch" else (2e-5, 0.9)
        self.family = family
        self.conv1 = nn.Conv2d(3, stem_width, 3, stem_stride, 1, bias=False)
        self.bn1 = _bn2d(stem_width, eps, momentum)
        self.prelu = nn.PReLU(stem_width)
        inplanes = stem_width
        for stage, (planes, blocks) in enumerate(zip(widths, stage_blocks, strict=True)):
            units = []
            for index in range(blocks):
                units.append(IBasicBlock(inplanes, planes, 2 if index == 0 else 1, eps, momentum))
                inplanes = planes
            setattr(self, f"layer{stage + 1}", nn.Sequential(*units))
        self.num_stages = len(widths)
        self.bn2 = _bn2d(inplanes, eps, momentum)
        self.dropout = nn.Dropout2d(dropout) if family == "magface" else nn.Dropout(dropout)
        self.fc = nn.Linear(inplanes * spatial * spatial, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim, eps=eps, momentum=momentum)
        if family == "arcface_torch":
            nn.init.constant_(self.features.weight, 1.0)
            self.features.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        for stage in range(self.num_stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        x = self.bn2(x)
        if self.family == "magface":
            x = torch.flatten(self.dropout(x), 1)
        else:
            x = self.dropout(torch.flatten(x, 1))
        return self.features(self.fc(x))


class BasicBlockIR(nn.Module):
    """AdaFace IR unit: MaxPool2d(1, stride) shortcut when channels match."""

    def __init__(self, in_channel: int, depth: int, stride: int):
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channel, depth, 1, stride, bias=False), nn.BatchNorm2d(depth)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, 3, 1, 1, bias=False),
            nn.BatchNorm2d(depth),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRNet(nn.Module):
    """AdaFace ``Backbone((112, 112), num_layers, 'ir')``, returning the raw embedding."""

    def __init__(self, stage_blocks: Sequence[int], dropout: float = 0.4, embedding_dim: int = 512):
        super().__init__()
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64)
        )
        units, in_channel = [], 64
        for depth, blocks in zip((64, 128, 256, 512), stage_blocks, strict=True):
            for index in range(blocks):
                units.append(BasicBlockIR(in_channel, depth, 2 if index == 0 else 1))
                in_channel = depth
        self.body = nn.Sequential(*units)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(512 * 7 * 7, embedding_dim),
            nn.BatchNorm1d(embedding_dim, affine=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_layer(self.body(self.input_layer(x)))


def _conv_bn(in_c, out_c, kernel=1, stride=1, padding=0, groups=1, prelu=True) -> nn.Sequential:
    layers = [
        nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(out_c),
    ]
    if prelu:
        layers.append(nn.PReLU(out_c))
    return nn.Sequential(*layers)


class _Block(nn.Module):
    """A module whose only child is ``layers`` (ConvBlock / LinearBlock / Residual / GDC)."""

    def __init__(self, layers: nn.Module):
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    def __init__(self, in_c: int, out_c: int, groups: int, stride: int, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            _Block(_conv_bn(in_c, groups)),
            _Block(_conv_bn(groups, groups, 3, stride, 1, groups=groups)),
            _Block(_conv_bn(groups, out_c, prelu=False)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


def _residual(c: int, num_blocks: int, groups: int) -> _Block:
    return _Block(nn.Sequential(*[DepthWise(c, c, groups, 1, True) for _ in range(num_blocks)]))


class MobileFaceNet(nn.Module):
    """arcface_torch ``get_mbf(False, 512)`` layout."""

    def __init__(self, blocks: Sequence[int] = (1, 4, 6, 2), scale: int = 2, embedding_dim=512):
        super().__init__()
        c1, c2 = 64 * scale, 128 * scale
        second = (
            _Block(_conv_bn(c1, c1, 3, 1, 1, groups=64))
            if blocks[0] == 1
            else _residual(c1, blocks[0], 128)
        )
        self.layers = nn.ModuleList(
            [
                _Block(_conv_bn(3, c1, 3, 2, 1)),
                second,
                DepthWise(c1, c1, 128, 2),
                _residual(c1, blocks[1], 128),
                DepthWise(c1, c2, 256, 2),
                _residual(c2, blocks[2], 256),
                DepthWise(c2, c2, 512, 2),
                _residual(c2, blocks[3], 256),
            ]
        )
        self.conv_sep = _Block(_conv_bn(c2, 512))
        self.features = _Block(
            nn.Sequential(
                _Block(_conv_bn(512, 512, 7, groups=512, prelu=False)),
                nn.Flatten(),
                nn.Linear(512, embedding_dim, bias=False),
                nn.BatchNorm1d(embedding_dim),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


def build_torch(arch: str, dropout: float | None = None) -> nn.Module:
    """The PyTorch module for ``arch`` (same defaults as ``magjax.models.build``), built by its
    family module's declaration (``Arch.torch``)."""
    return models.arch_spec(arch).torch(models.dropout_rate(arch, dropout))
