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

Checkpoints are read with ``torch.load(weights_only=True)``: no pickled code runs. Before that
the zip archive's CRC-32 checksums are verified (torch does not), so a damaged download is an
error naming the corrupt member rather than silently wrong weights. The only
extra type allowed is ``argparse.Namespace`` for AdaFace's hyper-parameters; a checkpoint that
needs anything else is refused (never re-read with ``weights_only=False``).

Mapping (the Flax modules mirror the PyTorch module names, ``layer1.0.bn1`` <->
``layer1_0/bn1``): Conv weight OIHW -> HWIO kernel; Linear weight (out, in) -> (in, out);
BatchNorm weight/bias -> params scale/bias and running_mean/var -> batch_stats mean/var;
PReLU weight -> params weight; a module's own parameter (the ViT's ``pos_embed``) keeps its
name; ``num_batches_tracked`` is dropped. PyTorch flattens the last NCHW feature map in
(C, H, W) order and Flax flattens NHWC in (H, W, C) order, so the rows of the Linear after the
flatten are permuted (the family's ``Layout.flattened_linear`` names them; the ViT flattens
tokens the same way on both sides). arcface_torch's frozen final BatchNorm scale is loaded
from ``features.weight`` like every other tensor. A missing, unexpected or mis-shaped tensor is
an error naming the key and the expected shape (the embedding width is read off the final
BatchNorm, so a transposed Linear weight is the one tensor named); so is a tensor holding NaN or
Inf, or a BatchNorm running variance below zero (``magjax.checkpoint.check_tensor_values``).

:func:`to_state_dict` is the inverse mapping (``python -m magjax.export --to FAMILY``).

An existing non-empty ``--out`` directory is refused unless ``--overwrite`` is given. The output
directory is written by ``magjax.checkpoint.save_inference_model`` with meta
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
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from magjax import checkpoint, cli, logs, models
from magjax.errors import UserError

SOURCES = models.FAMILIES

_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("params", "weight"): "weight",  # PReLU slope
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


class ConversionError(UserError):
    """A checkpoint that cannot be converted (layout, tensor names or shapes, unsafe pickle)."""


def _import_torch():
    try:
        import torch
    except ImportError as error:
        raise UserError(
            "magjax.convert needs PyTorch to read official checkpoints; install it with "
            "`pip install -r requirements-convert.txt` (the CPU build torch==2.13.0 is enough)"
        ) from error
    return torch


def check_archive(path: pathlib.Path) -> None:
    """Checks that ``path`` can be a PyTorch checkpoint before torch reads it.

    ``torch.save`` writes a zip archive whose members carry CRC-32 checksums that torch never
    verifies: every member is read here and a mismatch names the member. A file that is not a
    zip archive must be a legacy (torch < 1.6) pickle, which starts with the PROTO opcode.
    """
    size = path.stat().st_size
    if size == 0:
        raise ConversionError(f"{path}: empty file (0 bytes), not a PyTorch checkpoint")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as error:
            raise ConversionError(
                f"{path}: damaged zip archive ({error}); download the checkpoint again"
            ) from None
        if bad is not None:
            raise ConversionError(
                f"{path}: damaged checkpoint: member '{bad}' fails its CRC-32 check (the file "
                "was altered or cut short); download it again"
            )
        return
    with open(path, "rb") as f:
        start = f.read(2)
    if start[:1] != pickle.PROTO:
        raise ConversionError(
            f"{path}: not a PyTorch checkpoint: neither a zip archive (what torch.save writes) "
            f"nor a legacy torch pickle (starts with {start!r})"
        )


def _refusal(path: pathlib.Path, source: str, error: pickle.UnpicklingError) -> ConversionError:
    """A readable message for torch's weights-only refusal, without its advice to load with
    ``weights_only=False``."""
    text = str(error)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found is None:
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        reason = detail[0] if detail and "weights_only" not in detail[0] else type(error).__name__
        return ConversionError(
            f"{path}: damaged or foreign file: its pickle cannot be read ({reason})"
        )
    name = found.group(1)
    if name == "argparse.Namespace":
        return ConversionError(
            f"{path}: holds argparse.Namespace hyper-parameters, as AdaFace's Lightning "
            f"checkpoints do, not a {source} checkpoint: use --from adaface if it is one"
        )
    return ConversionError(
        f"{path}: refusing to load: it contains the pickled object GLOBAL {name}, which a "
        "checkpoint of tensors and plain containers never needs, and magjax never unpickles code"
    )


def load_checkpoint(path: str | pathlib.Path, source: str) -> Any:
    """``torch.load`` of ``path`` without executing pickled code (``weights_only=True``), after
    :func:`check_archive`; every failure is a :class:`ConversionError` naming the file."""
    if source not in SOURCES:
        raise ConversionError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    torch = _import_torch()
    check_archive(path)
    # Lightning stores AdaFace's argparse hyper-parameters; Namespace only restores attributes.
    allowed = [argparse.Namespace] if source == "adaface" else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _refusal(path, source, error) from None
    except (EOFError, RuntimeError, OSError) as error:  # cut short, or a zip torch cannot read
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ConversionError(
            f"{path}: cannot be read as a PyTorch checkpoint ({reason})"
        ) from None


def _strip(key: str, prefix: str) -> str | None:
    return key[len(prefix) :] if key.startswith(prefix) else None


def backbone_state_dict(checkpoint_obj: Any, source: str, path: str = "checkpoint") -> dict:
    """The backbone tensors of an official checkpoint, keyed as the bare backbone module.

    Returns ``{key: float32 numpy array}``; classifier/head tensors of the source are dropped.
    """
    if not isinstance(checkpoint_obj, Mapping):
        raise ConversionError(f"{path}: expected a dict, got {type(checkpoint_obj).__name__}")
    if source == "arcface_torch":
        if "state_dict" in checkpoint_obj and "state_dict_backbone" not in checkpoint_obj:
            raise ConversionError(
                f"{path}: holds a 'state_dict' entry, as magface and adaface checkpoints do, "
                "not an arcface_torch backbone: check --from"
            )
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
        checkpoint.check_tensor_values(key, result[stripped], path)
    return result


def torch_module_name(path: tuple[str, ...]) -> str:
    """Flax module path -> PyTorch module name (``("layer1_0", "bn1")`` -> ``layer1.0.bn1``)."""
    return ".".join(re.sub(r"_(\d+)$", r".\1", segment) for segment in path)


def _torch_key(collection: str, path: tuple[str, ...]) -> str:
    """Flax variable path -> PyTorch state_dict key (``layer1_0/bn1/scale`` ->
    ``layer1.0.bn1.weight``); a parameter declared by a module itself rather than by one of its
    layers (the ViT's ``pos_embed``) keeps its name (``pos_embed`` -> ``pos_embed``)."""
    leaf = _LEAF_TO_TORCH.get((collection, path[-1]))
    if leaf is None:
        return torch_module_name(path)
    return f"{torch_module_name(path[:-1])}.{leaf}" if len(path) > 1 else leaf


def _torch_shape(flax_shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    if leaf == "kernel" and len(flax_shape) == 4:  # HWIO -> OIHW
        return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
    if leaf == "kernel" and len(flax_shape) == 2:  # (in, out) -> (out, in)
        return (flax_shape[1], flax_shape[0])
    return tuple(flax_shape)


def embedding_dim_of(state: Mapping[str, np.ndarray], arch: str) -> int:
    """The embedding width of an ``arch`` checkpoint (512 in every official model): that of its
    final BatchNorm1d over the embedding (512 when that is missing, which is then reported).

    Read off the BatchNorm, not the embedding Linear: a Linear weight saved transposed would
    otherwise set the width, and every healthy tensor of the BatchNorm would then be reported
    as mis-shaped instead of the one wrong tensor."""
    norm = torch_module_name(models.arch_spec(arch).layout.embedding_norm)
    mean = state.get(f"{norm}.running_mean")
    return int(np.shape(mean)[0]) if mean is not None and np.ndim(mean) == 1 else 512


def convert_state_dict(
    state: Mapping[str, np.ndarray], arch: str, dtype: np.dtype = np.float32
) -> dict:
    """Maps a bare backbone ``state_dict`` (numpy) to magjax ``{"params", "batch_stats"}`` of
    ``dtype`` (float32; float64 for the float64 comparisons with PyTorch)."""
    abstract = models.abstract_variables(arch, embedding_dim=embedding_dim_of(state, arch))
    flattened_linear = models.arch_spec(arch).layout.flattened_linear
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
            transposed = " (transposed?)" if value.shape == expected[::-1] else ""
            problems["mis-shaped"].append(
                f"tensor {key!r} has shape {value.shape}, expected {expected}{transposed}"
            )
            continue
        if path[-1] == "kernel" and value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        elif path[-1] == "kernel" and value.ndim == 2:
            module = key[: -len(".weight")]
            if module in flattened_linear:
                # Rows in PyTorch's (C, H, W) flatten order -> Flax's (H, W, C) order.
                bn_mean = f"{flattened_linear[module]}.running_mean"
                if bn_mean not in state:
                    continue  # reported as a missing tensor below
                channels = state[bn_mean].shape[0]
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


def to_state_dict(variables: Mapping, arch: str) -> dict[str, np.ndarray]:
    """The inverse of :func:`convert_state_dict`: magjax ``{"params", "batch_stats"}`` of
    ``arch`` -> the bare backbone ``state_dict`` of the official module (numpy, float32).

    Every BatchNorm also gets ``num_batches_tracked`` (int64 0: magjax does not count batches and
    the official modules only read it when ``momentum=None``), so that
    ``load_state_dict(strict=True)`` sees exactly the official keys.
    """
    flat = traverse_util.flatten_dict(variables)
    abstract = traverse_util.flatten_dict(
        models.abstract_variables(arch, embedding_dim=embedding_dim_of_variables(variables, arch))
    )
    if set(flat) != set(abstract):
        names = sorted("/".join(k) for k in set(flat) ^ set(abstract))
        raise ConversionError(f"variables do not match arch {arch!r}: {', '.join(names[:4])}")
    state = {}
    for (collection, *path), value in flat.items():
        path = tuple(path)
        value = np.asarray(value, np.float32)
        if value.shape != abstract[(collection, *path)].shape:
            raise ConversionError(
                f"variable {'/'.join(path)} of {arch!r} has shape "
                f"{value.shape}, expected {abstract[(collection, *path)].shape}"
            )
        if path[-1] == "kernel" and value.ndim == 4:  # HWIO -> OIHW
            value = value.transpose(3, 2, 0, 1)
        elif path[-1] == "kernel" and value.ndim == 2:  # (in, out) -> (out, in)
            value = value.T
        state[_torch_key(collection, path)] = np.ascontiguousarray(value)
    for module, norm in models.arch_spec(arch).layout.flattened_linear.items():
        if f"{module}.weight" in state:
            # Rows in Flax's (H, W, C) flatten order -> PyTorch's (C, H, W) order.
            value = state[f"{module}.weight"]
            channels = state[f"{norm}.running_mean"].shape[0]
            side = math.isqrt(value.shape[1] // channels)
            value = value.reshape(value.shape[0], side, side, channels).transpose(0, 3, 1, 2)
            state[f"{module}.weight"] = np.ascontiguousarray(value.reshape(value.shape[0], -1))
    for key in [k for k in state if k.endswith(".running_mean")]:
        state[key[: -len("running_mean")] + "num_batches_tracked"] = np.zeros((), np.int64)
    return state


def embedding_dim_of_variables(variables: Mapping, arch: str) -> int:
    """Output width of the final BatchNorm1d of magjax ``arch`` backbone ``variables``."""
    path = models.arch_spec(arch).layout.embedding_norm
    stats = traverse_util.flatten_dict(variables["batch_stats"])
    if (*path, "mean") not in stats:
        raise ConversionError(
            f"variables of {arch!r} have no final embedding BatchNorm {'/'.join(path)}"
        )
    return int(np.shape(stats[(*path, "mean")])[0])


def convert(ckpt: str | pathlib.Path, source: str, arch: str, out: str | pathlib.Path) -> dict:
    """Reads ``ckpt`` (an official ``source`` checkpoint), writes the inference model to ``out``
    and returns its meta."""
    family = models.family(arch)  # also rejects unknown archs, listing the valid ones
    if arch in models.DEMO_ARCHS:
        raise ConversionError(f"{arch} is magjax's demo net; no official checkpoint exists for it")
    if family != source:
        valid = [
            a for a in models.ARCHS if models.family(a) == source and a not in models.DEMO_ARCHS
        ]
        raise ConversionError(
            f"arch {arch!r} belongs to family {family!r}, not {source!r}; "
            f"{source} archs: {', '.join(valid)}"
        )
    state = backbone_state_dict(load_checkpoint(ckpt, source), source, str(ckpt))
    try:
        variables = convert_state_dict(state, arch)
    except ConversionError as error:
        raise ConversionError(f"{ckpt}: {error}") from None
    meta = models.inference_meta(
        arch,
        embedding_dim_of(state, arch),
        converted_from={"path": str(pathlib.Path(ckpt).absolute()), "family": source},
    )
    checkpoint.save_inference_model(out, variables, meta)
    return meta


def main(argv: list[str]) -> int:
    parser = cli.ArgumentParser(
        prog="python -m magjax.convert",
        description="Convert an official PyTorch checkpoint into a magjax inference model.",
        epilog="examples:\n"
        "  python -m magjax.convert --from arcface_torch --arch iresnet100 "
        "ms1mv3_arcface_r100_fp16/backbone.pth --out models/r100\n"
        "  python -m magjax.convert --from magface --arch magface_iresnet100 "
        "magface_epoch_00025.pth --out models/magface_r100\n"
        "  python -m magjax.convert --from adaface --arch ir_101 "
        "adaface_ir101_ms1mv2.ckpt --out models/adaface_ir101\n"
        "then: python -m magjax.evaluate --workdir models/r100 --bins lfw.bin",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--from", dest="source", choices=SOURCES, required=True)
    parser.add_argument("ckpt", help="official checkpoint (.pth / .pt / .ckpt)")
    cli.add_arch_argument(parser, models.ARCHS, "--arch", required=True)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the model in an existing --out directory"
    )
    cli.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    logs.route_logging(None, verbose=args.verbose)
    return cli.run(lambda: _convert(args), verbose=args.verbose)


def _convert(args: argparse.Namespace) -> int:
    out = pathlib.Path(args.out)
    if out.exists() and not args.overwrite and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it")
    logs.start_jax(verbose=args.verbose)
    try:
        meta = convert(args.ckpt, args.source, args.arch, args.out)
    except RuntimeError as error:  # PyTorch missing, or torch.load failing on the file
        raise UserError(str(error)) from error
    print(f"wrote {args.out}: {meta['arch']} ({meta['family']}), input {meta['input_spec']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
