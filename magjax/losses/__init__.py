"""Margin losses for face recognition as pure, jit-able functions of arrays.

One module per loss family (e.g. ``arcface``: ArcFace, CosFace and the combined margin as
arcface_torch), each loss a :class:`MarginLoss` subclass registered under its name;
:mod:`magjax.losses.base` holds the interface and what they share (cosines, the cross entropy,
dense or class-sharded). Every module of this package is imported here, so a new loss is one
new module: ``MarginLoss.create(name)`` and the configs find it by its name.
"""

import importlib
import pkgutil

from magjax.losses.base import (
    Margin,
    MarginLoss,
    clamp,
    cosine_similarity,
    dense_loss,
    head_dtype,
    l2_normalize,
    margin_cross_entropy,
    margin_loss,
    masked_mean,
    registered,
    safe_norm,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Margin",
    "MarginLoss",
    "clamp",
    "cosine_similarity",
    "dense_loss",
    "head_dtype",
    "l2_normalize",
    "margin_cross_entropy",
    "margin_loss",
    "masked_mean",
    "registered",
    "safe_norm",
]
