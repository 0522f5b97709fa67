"""Import official PyTorch checkpoints into a magjax inference model.

    python -m magjax.convert --from arcface_torch|magface|adaface CKPT --arch ARCH --out DIR

Reads the checkpoint layout of each official repository:

* ``arcface_torch``: the plain ``state_dict`` of the backbone (``backbone.pth``), or a training
  checkpoint ``checkpoint_gpu_*.pt`` holding it under ``state_dict_backbone``;
* ``magface``: a dict whose ``state_dict`` has ``module.features.<key>`` (or, from
  DistributedDataParallel, ``features.module.<key>``) backbone tensors; the ``module.fc.*``
  classifier of the margin head is skipped;
* ``adaface``: a PyTorch Lightning checkpoint whose ``state_dict`` has ``model.<key>`` backbone
  tensors (the ``head.*`` tensors of the AdaFace head, its kernel and norm statistics, are
  skipped) next to ``hyper_parameters``, which can be an ``argparse.Namespace``.

Checkpoints are read with ``torch.load(weights_only=True)``: no pickled code runs. The only
extra type allowed is ``argparse.Namespace`` for AdaFace's hyper-parameters; a checkpoint that
needs anything else is refused (never re-read with ``weights_only=False``).

Mapping (the Flax modules mirror the PyTorch module names, ``layer1.0.bn1`` <->
``layer1_0/bn1``): Conv weight OIHW -> HWIO kernel; Linear weight (out, in) -> (in, out);
BatchNorm weight/bias -> params scale/bias and running_mean/var -> batch_stats mean/var;
PReLU weight -> params weight; ``num_batches_tracked`` is dropped. PyTorch flattens the last
NCHW feature map in (C, H, W) order and Flax flattens NHWC in (H, W, C) order, so the rows of the
Linear after the flatten are permuted. arcface_torch's frozen final BatchNorm scale is loaded
from ``features.weight`` like every other tensor. A missing, unexpected or mis-shaped tensor is
an error naming the key and the expected shape.

The output directory is written by ``magjax.checkpoint.save_inference_model`` with meta
``arch``, ``family``, ``input_spec`` (so inference applies RGB/BGR and the value range by
itself), ``embedding_dim`` and ``converted_from``.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import pickle
import re
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from magjax import checkpoint, models

SOURCES = models.FAMILIES

# Linear layers that follow a flatten of a spatial map, with the BatchNorm2d just before the
# flatten (its width is the channel count C of the map).
_FLATTENED_LINEAR = {"fc": "bn2", "output_layer.3": "output_layer.0"}
# The Linear that produces the embedding, per family of module names (gives embedding_dim).
_EMBEDDING_LINEAR = ("fc.weight", "output_layer.3.weight", "features.layers.2.weight")
_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("params", "weight"): "weight",  # PReLU slope
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted (layout, tensor names or shapes, unsafe pickle)."""


def _import_torch():
    try:
        import torch
    except ImportError as error:
        raise RuntimeError(
            "magjax.convert needs PyTorch to read official checkpoints; install it with "
            "`pip install -r requirements-convert.txt` (the CPU build torch==2.13.0 is enough)"
        ) from error
    return torch


def load_checkpoint(path: str | pathlib.Path, source: str) -> Any:
    """``torch.load`` of ``path`` without executing pickled code (``weights_only=True``)."""
    if source not in SOURCES:
        raise ConversionError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    torch = _import_torch()
    # Lightning stores AdaFace's argparse hyper-parameters; Namespace only restores attributes.
    allowed = [argparse.Namespace] if source == "adaface" else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message is mostly advice to use weights_only=False; keep the culprit only.
        found = re.search(r"WeightsUnpickler error: (.*?)(?:\. |\.?$)", str(error), re.M)
        reason = found.group(1) if found else " ".join(str(error).split())
        raise ConversionError(
            f"{path}: refusing to load: it contains pickled objects other than tensors and plain "
            f"containers, and magjax never unpickles code ({reason})"
        ) from error


def _strip(key: str, prefix: str) -> str | None:
    return key[len(prefix) :] if key.startswith(prefix) else None


def backbone_state_dict(checkpoint_obj: Any, source: str, path: str = "checkpoint") -> dict:
    """The backbone tensors of an official checkpoint, keyed as the bare backbone module.

    Returns ``{key: float32 numpy array}``; classifier/head tensors of the source are dropped.
    """
    if not isinstance(checkpoint_obj, Mapping):
        raise ConversionError(f"{path}: expected a dict, got {type(checkpoint_obj).__name__}")
    if source == "arcface_torch":
        state = checkpoint_obj.get("state_dict_backbone", checkpoint_obj)
        prefixes, skip = ("module.", ""), ()
    else:
        if "state_dict" not in checkpoint_obj:
            raise ConversionError(
                f"{path}: a {source} checkpoint is a dict with 'state_dict'; found keys "
                f"{sorted(map(str, checkpoint_obj))[:10]}"
            )
        state = checkpoint_obj["state_dict"]
        if source == "magface":
            # DataParallel gives module.features.*, DistributedDataParallel features.module.*
            # (MagFace's own inference loader accepts both).
            prefixes = ("module.features.", "features.module.", "features.")
            skip = ("module.fc.", "fc.")
        else:
            prefixes, skip = ("model.",), ("head.",)

    result = {}
    for key, value in state.items():
        if not hasattr(value, "shape"):
            raise ConversionError(f"{path}: state_dict entry {key!r} is not a tensor")
        if skip and key.startswith(skip):
            continue
        stripped = next((s for p in prefixes if (s := _strip(key, p)) is not None), None)
        if stripped is None:
            raise ConversionError(
                f"{path}: unexpected tensor {key!r} in a {source} checkpoint (backbone keys "
                f"start with {' or '.join(repr(p) for p in prefixes if p)})"
            )
        if stripped.endswith("num_batches_tracked"):
            continue
        result[stripped] = value.detach().cpu().float().numpy()
    return result


def _torch_key(collection: str, path: tuple[str, ...]) -> str:
    """Flax variable path -> PyTorch state_dict key (``layer1_0/bn1/scale`` ->
    ``layer1.0.bn1.weight``)."""
    module = ".".join(re.sub(r"_(\d+)$", r".\1", segment) for segment in path[:-1])
    return f"{module}.{_LEAF_TO_TORCH[(collection, path[-1])]}"


def _torch_shape(flax_shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    if leaf == "kernel" and len(flax_shape) == 4:  # HWIO -> OIHW
        return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
    if leaf == "kernel" and len(flax_shape) == 2:  # (in, out) -> (out, in)
        return (flax_shape[1], flax_shape[0])
    return tuple(flax_shape)


def embedding_dim_of(state: Mapping[str, np.ndarray]) -> int:
    """Output width of the checkpoint's embedding Linear (512 in every official model)."""
    for key in _EMBEDDING_LINEAR:
        if key in state and state[key].ndim == 2:
            return int(state[key].shape[0])
    return 512


def convert_state_dict(state: Mapping[str, np.ndarray], arch: str,
                       dtype: np.dtype = np.float32) -> dict:
    """Maps a bare backbone ``state_dict`` (numpy) to magjax ``{"params", "batch_stats"}`` of
    ``dtype`` (float32; float64 for the float64 comparisons with PyTorch)."""
    abstract = models.abstract_variables(arch, embedding_dim=embedding_dim_of(state))
    flat = traverse_util.flatten_dict(abstract)
    out, used = {}, set()
    problems = {"missing": [], "mis-shaped": [], "unexpected": []}
    # Parameters first, so that error messages start with weights rather than statistics.
    for (collection, *path), spec in sorted(flat.items(), key=lambda kv: kv[0][0] != "params"):
        path = tuple(path)
        key = _torch_key(collection, path)
        expected = _torch_shape(spec.shape, path[-1])
        if key not in state:
            problems["missing"].append(f"missing tensor {key!r} (expected shape {expected})")
            continue
        value = np.asarray(state[key], dtype)
        used.add(key)
        if value.shape != expected:
            problems["mis-shaped"].append(
                f"tensor {key!r} has shape {value.shape}, expected {expected}"
            )
            continue
        if path[-1] == "kernel" and value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        elif path[-1] == "kernel" and value.ndim == 2:
            module = key[: -len(".weight")]
            if module in _FLATTENED_LINEAR:
                # Rows in PyTorch's (C, H, W) flatten order -> Flax's (H, W, C) order.
                channels = state[f"{_FLATTENED_LINEAR[module]}.running_mean"].shape[0]
                side = math.isqrt(value.shape[1] // channels)
                value = value.reshape(value.shape[0], channels, side, side)
                value = value.transpose(0, 2, 3, 1).reshape(value.shape[0], -1)
            value = value.T
        out[(collection, *path)] = np.ascontiguousarray(value)
    problems["unexpected"] = [
        f"unexpected tensor {key!r} {tuple(state[key].shape)}" for key in sorted(set(state) - used)
    ]
    if any(problems.values()):
        # A few of each kind: a wrong --arch shows up as both missing and unexpected names.
        counts = ", ".join(f"{len(v)} {k}" for k, v in problems.items() if v)
        shown = [p for v in problems.values() for p in v[:4]]
        raise ConversionError(
            f"checkpoint does not match arch {arch!r} ({counts} tensors): " + "; ".join(shown)
        )
    return traverse_util.unflatten_dict(out)


def convert(ckpt: str | pathlib.Path, source: str, arch: str, out: str | pathlib.Path) -> dict:
    """Reads ``ckpt`` (an official ``source`` checkpoint), writes the inference model to ``out``
    and returns its meta."""
    family = models.family(arch)  # also rejects unknown archs, listing the valid ones
    if arch in models.DEMO_ARCHS:
        raise ConversionError(f"{arch} is magjax's demo net; no official checkpoint exists for it")
    if family != source:
        valid = [a for a in models.ARCHS
                 if models.family(a) == source and a not in models.DEMO_ARCHS]
        raise ConversionError(
            f"arch {arch!r} belongs to family {family!r}, not {source!r}; "
            f"{source} archs: {', '.join(valid)}"
        )
    state = backbone_state_dict(load_checkpoint(ckpt, source), source, str(ckpt))
    try:
        variables = convert_state_dict(state, arch)
    except ConversionError as error:
        raise ConversionError(f"{ckpt}: {error}") from None
    meta = {
        "arch": arch,
        "family": source,
        "input_spec": models.input_spec(arch),
        "embedding_dim": embedding_dim_of(state),
        "converted_from": {"path": str(pathlib.Path(ckpt).absolute()), "family": source},
    }
    checkpoint.save_inference_model(out, variables, meta)
    return meta


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m magjax.convert",
        description="Convert an official PyTorch checkpoint into a magjax inference model.",
    )
    parser.add_argument("--from", dest="source", choices=SOURCES, required=True)
    parser.add_argument("ckpt", help="official checkpoint (.pth / .pt / .ckpt)")
    parser.add_argument("--arch", required=True, choices=models.ARCHS)
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    try:
        meta = convert(args.ckpt, args.source, args.arch, args.out)
    except (ConversionError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {meta['arch']} ({meta['family']}), input {meta['input_spec']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
