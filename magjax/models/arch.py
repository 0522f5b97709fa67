"""What the rest of magjax asks of a backbone architecture, declared once per family module.

A backbone family is one module (``iresnet``, ``ir``, ``mobilefacenet``, ``vit``) holding the
Flax modules and a tuple ``ARCHS`` of :class:`Arch` entries; ``magjax.models`` collects them.
Training, ``models summary``, ``FaceEncoder`` and the benchmarks use ``Arch.build``;
``magjax.convert`` maps the official ``state_dict`` by rule from the Flax variable names plus
the few facts of :class:`Layout`; ``magjax.export`` wires the ONNX graph with ``Layout.onnx``;
the PyTorch side of the parity tests and ``bench backbone`` comes from ``Arch.torch``. A new
family is its module, its PyTorch definition, its recipe rows and its tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

FAMILIES = ("arcface_torch", "magface", "adaface")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a family's official PyTorch ``state_dict`` relates to its Flax variables.

    ``embedding_norm``: the Flax module path of the final BatchNorm1d over the embedding (its
    width is the embedding size). ``flattened_linear``: PyTorch Linear modules that follow a
    flatten of an NCHW feature map, each mapped to the BatchNorm2d just before the flatten
    (PyTorch flattens in (C, H, W) order and Flax in (H, W, C) order, so their rows are
    permuted). ``onnx``: ``onnx(g, x) -> output name`` emits the graph from the input ``x``
    with ``magjax.export``'s graph builder ``g`` (which reads the ``state_dict`` tensors by
    their PyTorch names and checks that every one is used).
    """

    embedding_norm: tuple[str, ...]
    onnx: Callable[[Any, str], str]
    flattened_linear: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Arch:
    """One architecture name and everything magjax needs of it.

    ``family``: the official repository it reproduces, which fixes the input convention
    (``magjax.models.input_spec``) and the checkpoint layout ``magjax.convert`` reads.
    ``build(dtype=, dropout=, embedding_dim=)``: the Flax module (``dropout`` already resolved to
    a float). ``default_dropout``: the rate the official family trains with; ``None`` when the
    architecture has no dropout layer (a non-zero rate is then refused). ``official``: False for
    magjax's own demo nets, of which no official checkpoint exists. ``frozen``: parameter paths
    the official code never trains. ``torch(dropout)``: the PyTorch module with the official
    ``state_dict`` keys (imports torch when called).
    """

    name: str
    family: str
    build: Callable[..., Any]
    layout: Layout
    torch: Callable[[float], Any]
    default_dropout: float | None = 0.0
    official: bool = True
    frozen: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"arch {self.name}: family {self.family!r} is not one of {FAMILIES}")
