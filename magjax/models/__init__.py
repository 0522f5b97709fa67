"""Face-recognition backbones matching the official PyTorch architectures, in Flax linen.

``build(arch)`` returns a module whose ``__call__(images, *, train)`` maps normalised NHWC float
images [B, 112, 112, 3] to the RAW (un-normalised) float32 embedding [B, embedding_dim]; the
margin losses normalise it and read its norm. Variables: ``params`` (always float32) and
``batch_stats``; with dropout > 0 a training call needs the ``dropout`` rng.

Families (the official repository each architecture reproduces, which fixes the input
convention and the checkpoint layout ``magjax.convert`` reads):

* ``arcface_torch``: ``iresnet18/34/50/100/200``, ``mbf`` (insightface arcface_torch), and
  ``tiny``, a small iresnet-style net for the CPU demo (not an official architecture);
  ``magface_tiny`` is the same net in the MagFace family (trainable final BatchNorm scale, so
  that feature magnitudes can spread: with arcface_torch's fixed scale their mean is pinned);
* ``magface``: ``magface_iresnet18/34/50/100`` (MagFace's iresnet variant);
* ``adaface``: ``ir_18/34/50/101`` (AdaFace's IR nets).

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

from magjax.models import ir, iresnet, mobilefacenet

ARCHS = (
    "iresnet18",
    "iresnet34",
    "iresnet50",
    "iresnet100",
    "iresnet200",
    "magface_iresnet18",
    "magface_iresnet34",
    "magface_iresnet50",
    "magface_iresnet100",
    "ir_18",
    "ir_34",
    "ir_50",
    "ir_101",
    "mbf",
    "tiny",
    "magface_tiny",
)
DEMO_ARCHS = ("tiny", "magface_tiny")  # magjax's CPU-demo nets; no official checkpoint exists
# The demo nets: a stride-2 stem, then one block per stage, 112 -> 56 -> 28 -> 14 -> 7 -> 4 and a
# 4*4*64 head. Narrow because XLA's CPU convolution weight gradients at 56x56 and 28x28 dominate
# the step (BENCHMARKS.md); 0.6 M parameters.
TINY_STAGE_BLOCKS = (1, 1, 1, 1)
TINY_WIDTHS = (8, 16, 32, 64)
FAMILIES = ("arcface_torch", "magface", "adaface")
INPUT_SHAPE = (112, 112, 3)

# x_float = (x_uint8 / 255 - mean) / std, channels in `channel_order` (field.md section 1).
_INPUT_SPECS = {
    "arcface_torch": {"channel_order": "RGB", "mean": 0.5, "std": 0.5},
    "magface": {"channel_order": "BGR", "mean": 0.0, "std": 1.0},
    "adaface": {"channel_order": "BGR", "mean": 0.5, "std": 0.5},
}
# Dropout each official family trains with by default.
DEFAULT_DROPOUT = {"arcface_torch": 0.0, "magface": 0.4, "adaface": 0.4}


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid archs: {', '.join(ARCHS)}")


def family(arch: str) -> str:
    """The official repository ``arch`` reproduces: arcface_torch, magface or adaface."""
    _check_arch(arch)
    if arch.startswith("magface_"):
        return "magface"
    if arch.startswith("ir_"):
        return "adaface"
    return "arcface_torch"


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


def build(
    arch: str,
    *,
    dtype: Any = jnp.float32,
    dropout: float | None = None,
    embedding_dim: int = 512,
) -> nn.Module:
    """The Flax backbone ``arch``; ``dtype`` is the compute dtype (parameters stay float32).

    ``dropout=None`` takes the official family's default (arcface_torch 0.0, MagFace and
    AdaFace 0.4); ``mbf`` has no dropout layer.
    """
    _check_arch(arch)
    fam = family(arch)
    rate = DEFAULT_DROPOUT[fam] if dropout is None else float(dropout)
    if arch == "mbf":
        if rate:
            raise ValueError(f"mbf has no dropout layer; got dropout={dropout}")
        return mobilefacenet.MobileFaceNet(embedding_dim=embedding_dim, dtype=dtype)
    if arch in DEMO_ARCHS:
        return iresnet.IResNet(
            stage_blocks=TINY_STAGE_BLOCKS,
            widths=TINY_WIDTHS,
            stem_width=TINY_WIDTHS[0],
            stem_stride=2,
            family=fam,
            dropout=rate,
            embedding_dim=embedding_dim,
            dtype=dtype,
        )
    depth = int(arch.rsplit("iresnet", 1)[-1] if "iresnet" in arch else arch[len("ir_") :])
    if fam == "adaface":
        blocks = ir.STAGE_BLOCKS[100 if depth == 101 else depth]
        return ir.IRNet(blocks, dropout=rate, embedding_dim=embedding_dim, dtype=dtype)
    return iresnet.IResNet(
        iresnet.STAGE_BLOCKS[depth],
        family=fam,
        dropout=rate,
        embedding_dim=embedding_dim,
        dtype=dtype,
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
        return backbone.apply(variables, images, train=True, mutable=["batch_stats"],
                              rngs={"dropout": dropout_key})
    if images.shape[0] % groups:
        raise ValueError(f"batch of {images.shape[0]} does not split into {groups} groups")

    def one_group(group_images, key):
        embeddings, updates = backbone.apply(variables, group_images, train=True,
                                             mutable=["batch_stats"], rngs={"dropout": key})
        return embeddings, updates.get("batch_stats", {})

    grouped = images.reshape(groups, images.shape[0] // groups, *images.shape[1:])
    embeddings, batch_stats = jax.vmap(one_group)(grouped,
                                                  jax.random.split(dropout_key, groups))
    embeddings = embeddings.reshape(images.shape[0], *embeddings.shape[2:])
    return embeddings, {"batch_stats": jax.tree.map(lambda stat: stat[0], batch_stats)}


def inference_meta(arch: str, embedding_dim: int, **provenance: Any) -> dict:
    """What an exported inference model's ``model.json`` says of it (``magjax.checkpoint``):
    the architecture, its family and input convention, the embedding size, and where the
    weights come from (``trained_with`` and ``step``, or ``converted_from``)."""
    return {"arch": arch, "family": family(arch), "input_spec": input_spec(arch),
            "embedding_dim": embedding_dim, **provenance}


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
    _check_arch(arch)
    if family(arch) == "arcface_torch" and arch != "mbf":
        return (("features", "scale"),)
    return ()


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
