"""Face-recognition backbones matching the official PyTorch architectures, in Flax linen.

``build(arch)`` returns a module whose ``__call__(images, *, train)`` maps normalised NHWC float
images [B, 112, 112, 3] to the RAW (un-normalised) float32 embedding [B, embedding_dim]; the
margin losses normalise it and read its norm. Variables: ``params`` (always float32) and
``batch_stats``; with dropout > 0 a training call needs the ``dropout`` rng.

Each backbone family is one module declaring its archs (:mod:`magjax.models.arch`):
``iresnet`` (arcface_torch's ``iresnet18/34/50/100/200``, MagFace's
``magface_iresnet18/34/50/100``, and the CPU-demo nets ``tiny`` and ``magface_tiny``), ``ir``
(AdaFace's ``ir_18/34/50/101``), ``mobilefacenet`` (arcface_torch's ``mbf``), ``vit``
(arcface_torch's Vision Transformers ``vit_t`` ... ``vit_h`` and the CPU net ``vit_demo``). An
arch belongs to the official repository it reproduces (its family: ``arcface_torch``,
``magface``, ``adaface``), which fixes the input convention and the checkpoint layout
``magjax.convert`` reads. An unknown name is a :class:`UnknownArchError` (a user error) listing
the valid ones.

BatchNorm under data parallelism (:func:`apply_train`, ``config.model.batchnorm_stats``): the
train step runs the backbone under plain ``jax.jit`` with the batch sharded on mesh axis
``data``. With ``"global"`` statistics XLA computes them over the global batch (as synchronised
BatchNorm would); with ``"per_device"`` each device's shard of the batch is normalised with its
own statistics, as the official trainers' plain BatchNorm under DDP. No module sets
``axis_name``.

Frozen parameter: arcface_torch fixes the final BatchNorm1d scale (``features/scale``) to 1.
It is a counted, loadable parameter whose gradient is exactly zero (read through
``stop_gradient``); optimisers that decay weights outside the gradient must mask it out with
:func:`trainable_mask`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from magjax import parallel
from magjax.errors import UserError
from magjax.models import ir, iresnet, mobilefacenet, vit
from magjax.models.arch import FAMILIES, Arch

# One module per backbone family, each declaring its archs (magjax.models.arch).
FAMILY_MODULES = (iresnet, ir, mobilefacenet, vit)
_ARCHS: dict[str, Arch] = {spec.name: spec for module in FAMILY_MODULES for spec in module.ARCHS}
ARCHS = tuple(_ARCHS)
DEMO_ARCHS = tuple(name for name, spec in _ARCHS.items() if not spec.official)
INPUT_SHAPE = (112, 112, 3)
__all__ = ["ARCHS", "DEMO_ARCHS", "FAMILIES", "INPUT_SHAPE", "Arch", "arch_spec", "build"]

# x_float = (x_uint8 / 255 - mean) / std, channels in `channel_order` (field.md section 1).
_INPUT_SPECS = {
    "arcface_torch": {"channel_order": "RGB", "mean": 0.5, "std": 0.5},
    "magface": {"channel_order": "BGR", "mean": 0.0, "std": 1.0},
    "adaface": {"channel_order": "BGR", "mean": 0.5, "std": 0.5},
}


class UnknownArchError(UserError):
    """An architecture name magjax does not have."""


def arch_spec(arch: str) -> Arch:
    """The declaration of ``arch`` (:class:`magjax.models.arch.Arch`); an unknown name is a
    :class:`UnknownArchError` listing the valid ones."""
    try:
        return _ARCHS[arch]
    except KeyError:
        raise UnknownArchError(f"unknown arch {arch!r}; valid archs: {', '.join(ARCHS)}") from None


def family(arch: str) -> str:
    """The official repository ``arch`` reproduces: arcface_torch, magface or adaface."""
    return arch_spec(arch).family


def input_spec(arch: str) -> dict:
    """The input convention of ``arch`` (JSON-serialisable), for :func:`preprocess`."""
    return dict(_INPUT_SPECS[family(arch)])


def preprocess(images_uint8_rgb: jax.Array, spec: dict, dtype: Any = jnp.float32) -> jax.Array:
    """uint8 RGB images [..., H, W, 3] -> float32 (or ``dtype``) network input following
    ``spec``.

    Pure jnp, so it runs on device inside the jitted train/eval step.
    """
    order = spec.get("channel_order")
    if order not in ("RGB", "BGR"):
        raise ValueError(f"input spec channel_order must be 'RGB' or 'BGR', got {order!r}")
    if images_uint8_rgb.shape[-1] != 3:
        raise ValueError(f"expected images [..., H, W, 3], got shape {images_uint8_rgb.shape}")
    x = jnp.asarray(images_uint8_rgb).astype(dtype) / 255.0
    if order == "BGR":
        x = x[..., ::-1]
    mean = jnp.asarray(spec["mean"], dtype)
    std = jnp.asarray(spec["std"], dtype)
    return (x - mean) / std


def dropout_rate(arch: str, dropout: float | None = None) -> float:
    """``dropout``, or the official family's default for ``arch`` when None (arcface_torch 0.0,
    MagFace and AdaFace 0.4); a non-zero rate for an arch without a dropout layer is refused."""
    spec = arch_spec(arch)
    if spec.default_dropout is None:
        if dropout:
            raise UserError(f"{arch} has no dropout layer; got dropout={dropout}")
        return 0.0
    return spec.default_dropout if dropout is None else float(dropout)


def build(
    arch: str,
    *,
    dtype: Any = jnp.float32,
    dropout: float | None = None,
    embedding_dim: int = 512,
) -> nn.Module:
    """The Flax backbone ``arch``; ``dtype`` is the compute dtype (parameters stay float32).

    ``dropout=None`` takes the official family's default (:func:`dropout_rate`).
    """
    return arch_spec(arch).build(
        dtype=dtype, dropout=dropout_rate(arch, dropout), embedding_dim=embedding_dim
    )


BATCHNORM_STATS = ("per_device", "global")


def apply_train(
    backbone: nn.Module,
    variables: dict,
    images: jax.Array,
    *,
    dropout_key: jax.Array,
    groups: int = 1,
) -> tuple[jax.Array, dict]:
    """Training-mode forward pass: ``(embeddings, new batch_stats)``.

    ``groups > 1`` splits the batch into that many consecutive equal parts (one per device of
    the ``data`` mesh axis: the rows each device holds) and normalises each with its own
    BatchNorm statistics, as one DDP rank does with plain ``BatchNorm``; the parts run as one
    ``jax.vmap``, so the step stays a plain jit and no statistic crosses devices. The running
    statistics returned are those of the first part: under DDP (``broadcast_buffers=True``)
    every forward starts from rank 0's buffers and the official checkpoint is rank 0's, so the
    official running statistics follow rank 0's batches alone (``nn.DataParallel``, MagFace's
    trainer, likewise keeps only device 0's replica updates).
    """
    if groups == 1:
        return backbone.apply(
            variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": dropout_key}
        )
    if images.shape[0] % groups:
        raise ValueError(f"batch of {images.shape[0]} does not split into {groups} groups")

    def one_group(group_images, key):
        embeddings, updates = backbone.apply(
            variables, group_images, train=True, mutable=["batch_stats"], rngs={"dropout": key}
        )
        return embeddings, updates.get("batch_stats", {})

    grouped = images.reshape(groups, images.shape[0] // groups, *images.shape[1:])
    embeddings, batch_stats = jax.vmap(one_group)(grouped, jax.random.split(dropout_key, groups))
    embeddings = embeddings.reshape(images.shape[0], *embeddings.shape[2:])
    return embeddings, {"batch_stats": jax.tree.map(lambda stat: stat[0], batch_stats)}


def per_device_forward(
    backbone: nn.Module,
    mesh: jax.sharding.Mesh,
    variables: dict,
    images: jax.Array,
    *,
    dropout_key: jax.Array,
    gradient_dtype: Any,
) -> tuple[jax.Array, dict]:
    """:func:`apply_train` with per-device statistics (``groups`` = the devices of ``data``,
    the same values), run under ``jax.shard_map`` so that the backbone gradient is reduced
    explicitly: each device's gradient rounded to ``gradient_dtype`` and all-reduced in it
    (``parallel.reduce_gradient_in``), as DDP's gradient compression hooks do. Device ``i``
    draws dropout from ``split(dropout_key, devices)[i]``, as group ``i`` of ``apply_train``."""
    data = parallel.DATA_AXIS
    keys = jax.random.split(dropout_key, mesh.shape[data])

    def on_device(params, batch_stats, device_images, key):
        params = parallel.reduce_gradient_in(params, jnp.dtype(gradient_dtype))
        embeddings, updates = apply_train(
            backbone,
            {"params": params, "batch_stats": batch_stats},
            device_images,
            dropout_key=key[0],
        )
        return embeddings, jax.tree.map(lambda stat: stat[None], updates.get("batch_stats", {}))

    embeddings, batch_stats = jax.shard_map(
        on_device, mesh=mesh, in_specs=(P(), P(), P(data), P(data)), out_specs=(P(data), P(data))
    )(variables["params"], variables["batch_stats"], images, keys)
    # Device 0's running statistics, as apply_train's (DDP rank 0's buffers).
    return embeddings, {"batch_stats": jax.tree.map(lambda stat: stat[0], batch_stats)}


def inference_meta(arch: str, embedding_dim: int, **provenance: Any) -> dict:
    """What an exported inference model's ``model.json`` says of it (``magjax.checkpoint``):
    the architecture, its family and input convention, the embedding size, and where the
    weights come from (``trained_with`` and ``step``, or ``converted_from``)."""
    return {
        "arch": arch,
        "family": family(arch),
        "input_spec": input_spec(arch),
        "embedding_dim": embedding_dim,
        **provenance,
    }


def abstract_variables(arch: str, **build_kwargs: Any) -> dict:
    """Shapes/dtypes of ``{"params", "batch_stats"}`` via ``jax.eval_shape`` (no allocation)."""
    model = build(arch, **build_kwargs)
    images = jax.ShapeDtypeStruct((1, *INPUT_SHAPE), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)


def count_params(arch: str, **build_kwargs: Any) -> int:
    """Number of parameters as the official code counts them (frozen ones included, BatchNorm
    running statistics excluded, PReLU slopes included)."""
    params = abstract_variables(arch, **build_kwargs)["params"]
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(params)))


def frozen_params(arch: str) -> tuple[tuple[str, ...], ...]:
    """Paths of the parameters the official code never trains (arcface_torch's fixed scale)."""
    return arch_spec(arch).frozen


def trainable_mask(arch: str, params: Any) -> Any:
    """A pytree of bools like ``params``: False for the frozen parameters of ``arch``.

    Use with e.g. ``optax.masked(optax.add_decayed_weights(wd), mask)`` or
    ``optax.multi_transform`` so that weight decay cannot move a frozen parameter.
    """
    frozen = set(frozen_params(arch))
    flat = traverse_util.flatten_dict(params)
    missing = frozen - set(flat)
    if missing:
        raise ValueError(f"params of {arch} lack frozen parameter(s) {sorted(missing)}")
    return traverse_util.unflatten_dict({path: path not in frozen for path in flat})
