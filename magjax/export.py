"""Models leave magjax: an ONNX file for insightface / onnxruntime, or an official PyTorch
checkpoint.

    python -m magjax.export --workdir W [--best] --out model.onnx
    python -m magjax.export --workdir W [--best] --to arcface_torch|magface|adaface --out FILE

``W`` is resolved like ``FaceEncoder.load``: an inference-model directory (``magjax.convert``
output) or a training workdir, whose ``model/`` is used (``model_best/`` with ``--best``).

ONNX: one input ``input`` [N, 3, 112, 112] float32 (N dynamic), one output ``embedding`` [N, d],
the raw embedding whose L2 norm is the quality score (MagFace's magnitude; AdaFace's normalised
feature times its norm). The input follows insightface's ``ArcFaceONNX`` (``get_feat``): it feeds
RGB and normalises with ``(x - 127.5) / 127.5`` unless the graph's first eight nodes include
nodes named ``Sub*`` and ``Mul*``, in which case it feeds raw RGB 0..255 values. So:

* a model whose input convention is arcface_torch's (RGB, ``(x/255 - 0.5)/0.5``) gets no
  preprocessing in the graph and reads ``(x - 127.5) / 127.5`` of RGB values;
* any other convention (MagFace: BGR, ``x/255``; AdaFace: BGR, ``(x/255 - 0.5)/0.5``) is built
  into the top of the graph: ``Gather_rgb_to_bgr`` (channel flip, for BGR models), ``Sub_mean``
  and ``Mul_scale``, so the graph reads raw RGB 0..255 values.

The convention is also recorded in the model's ``metadata_props`` (``magjax_input_spec``: the
model's own spec as JSON; ``input_convention``: what the graph's input expects, in words).

Weights of 2 GiB or more (vit_h's ~3 GB; protobuf cannot serialise a larger message) are written
as ONNX external data (:func:`save_onnx`): ``--out`` holds the graph, ``--out`` + ``.data``
(``model.onnx.data``) all the weights. Keep the two files side by side under these names and
load the ``.onnx`` by path: ``onnxruntime.InferenceSession(path)`` and insightface's
``get_model(path)`` then read the weights (not from bytes). insightface's ``ArcFaceONNX`` also
calls ``onnx.load(path)`` to look at the first nodes, which reads every weight into memory once
more, so ``get_model`` needs over twice the weights in RAM while it loads (measured: 5.4 GiB at
peak for 2.3 GiB of weights), then once (onnxruntime's copy). Smaller models are one
self-contained file.

Why the graph is written with ``onnx.helper`` rather than a JAX exporter: ``jax2onnx``, the
maintained one, requires orbax-checkpoint < 0.11.37, which conflicts with magjax's pinned 0.12.8
(docs/jax-stack.md, ONNX). The backbones are few and plain (conv, BatchNorm, PReLU, add,
max-pool shortcut, flatten, linear; for the ViT also LayerNormalization (opset 17), MatMul,
Reshape/Transpose, Softmax and Clip for ReLU6), so the graph is emitted from the PyTorch-layout
tensors of ``magjax.convert.to_state_dict`` (OIHW convolutions, the (C, H, W) flatten order ONNX
uses too). Per-layer settings (strides, paddings, groups, BatchNorm and LayerNorm epsilon,
attention heads) are read off the Flax modules themselves during an abstract forward pass, so
only the wiring is written, by each family module (``Layout.onnx`` of
:mod:`magjax.models.arch`), with :class:`GraphBuilder`. A BatchNorm that follows a convolution
or an embedding Linear is folded into it (in float64); the pre-activation
BatchNorms that precede a convolution stay ``BatchNormalization`` nodes (folding them would be
wrong at the zero-padded borders).

PyTorch: ``--to FAMILY`` writes the official repository's checkpoint layout, which its own code
loads with ``torch.load(weights_only=True)`` and ``load_state_dict(strict=True)`` after its usual
unwrapping: arcface_torch the bare ``state_dict`` (``backbone.pth``); MagFace
``{"arch", "state_dict": {"module.features.<key>": ...}}``; AdaFace ``{"state_dict":
{"model.<key>": ...}}`` (Lightning's layout). It is the inverse of ``magjax.convert``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magjax import checkpoint, cli, convert, files, logs, models
from magjax.encoder import resolve_model_dir
from magjax.errors import UserError

OPSET = 17  # ONNX opset 17 / IR version 8: read by every onnxruntime since 1.14
IR_VERSION = 8
INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
# The input convention insightface's ArcFaceONNX applies itself to a graph without Sub/Mul at
# its top: RGB, (x - 127.5) / 127.5, i.e. arcface_torch's (x/255 - 0.5)/0.5.
INSIGHTFACE_DEFAULT_SPEC = {"channel_order": "RGB", "mean": 0.5, "std": 0.5}
# Protobuf cannot serialise a message of 2 GiB or more, so a model whose weights take at least
# this many bytes (vit_h: ~3 GB) is written with ONNX external data: the graph in --out, the
# weights in --out + ".data" beside it. The 64 MiB margin is for the graph and its metadata
# (under 1 MiB for every arch).
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def model_directory(workdir: str | pathlib.Path, *, best: bool = False) -> pathlib.Path:
    """The inference-model directory of ``workdir`` (``FaceEncoder.load``'s rule; ``best``:
    the training workdir's ``model_best/``)."""
    workdir = pathlib.Path(workdir)
    try:
        if best:
            return resolve_model_dir(workdir / "model_best")
        return resolve_model_dir(workdir)
    except FileNotFoundError as error:
        raise UserError(f"--workdir {workdir}: {error}") from None


def load_model(workdir: str | pathlib.Path, *, best: bool = False) -> tuple[Any, dict]:
    """``(variables, meta)`` of the inference model of ``workdir`` (see :func:`model_directory`)."""
    variables, meta = checkpoint.load_inference_model(model_directory(workdir, best=best))
    if meta.get("arch") not in models.ARCHS:
        raise UserError(
            f"{workdir}: model.json names arch {meta.get('arch')!r}; expected one "
            f"of {', '.join(models.ARCHS)}"
        )
    return variables, meta


# ----------------------------------------------------------------------------------- ONNX


def _import_onnx():
    try:
        import onnx
        import onnx.helper
        import onnx.numpy_helper
    except ImportError as error:
        raise UserError(
            "the ONNX export needs onnx; install it with `pip install -r requirements-export.txt`"
        ) from error
    return onnx


def _conv_settings(module: nn.Conv) -> dict:
    """ONNX ``Conv`` attributes of a Flax convolution (its strides and padding in any of the
    forms Flax accepts: an int, pairs, ``"VALID"``)."""
    rank = len(module.kernel_size)
    strides = module.strides or 1
    strides = [strides] * rank if isinstance(strides, int) else list(strides)
    padding = nn.linear.canonicalize_padding(module.padding, rank)
    if padding == "VALID":
        padding = [(0, 0)] * rank
    elif isinstance(padding, str):  # SAME/CIRCULAR: no official backbone has them
        raise NotImplementedError(f"ONNX export of a {padding!r}-padded convolution")
    return {
        "strides": strides,
        "pads": [p[0] for p in padding] + [p[1] for p in padding],
        "group": module.feature_group_count,
    }


def _layer_settings(arch: str, variables: Any) -> dict[str, dict]:
    """Strides, paddings and groups of every convolution, the epsilon of every BatchNorm and
    LayerNorm and the head count of every attention module (a module with an int ``heads``
    field) of ``arch``, keyed by the PyTorch module name (``layer1.0.conv1``), read from the
    Flax modules during an abstract forward pass."""
    embedding_dim = convert.embedding_dim_of_variables(variables, arch)
    model = models.build(arch, embedding_dim=embedding_dim)
    settings = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        name = convert.torch_module_name(module.path)
        if isinstance(module, nn.Conv):
            settings[name] = _conv_settings(module)
        elif isinstance(module, nn.BatchNorm | nn.LayerNorm):
            settings[name] = {"epsilon": module.epsilon}
        elif isinstance(getattr(module, "heads", None), int):
            settings[name] = {"heads": module.heads}
        return next_fun(*args, **kwargs)

    images = jax.ShapeDtypeStruct((1, *models.INPUT_SHAPE), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    return settings


class GraphBuilder:
    """Emits ONNX nodes from a PyTorch-layout ``state_dict``; every tensor must be used once."""

    def __init__(self, state: Mapping[str, np.ndarray], settings: Mapping[str, dict]):
        onnx = _import_onnx()

        self._helper = onnx.helper
        self._to_tensor = onnx.numpy_helper.from_array
        self.state = state
        self.settings = settings
        self.nodes: list = []
        self.initializers: list = []
        self.unused = {k for k in state if not k.endswith("num_batches_tracked")}

    def has(self, module: str) -> bool:
        return f"{module}.weight" in self.state or f"{module}.running_mean" in self.state

    def has_prefix(self, module: str) -> bool:
        return any(key.startswith(f"{module}.") for key in self.state)

    def _take(self, key: str) -> np.ndarray:
        self.unused.discard(key)
        return np.asarray(self.state[key], np.float64)

    def constant(self, name: str, value: np.ndarray, dtype: Any = np.float32) -> str:
        self.initializers.append(self._to_tensor(np.asarray(value, dtype), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attributes) -> str:
        self.nodes.append(self._helper.make_node(op, inputs, [name], name=name, **attributes))
        return name

    def _norm(self, module: str) -> tuple[np.ndarray, np.ndarray]:
        """BatchNorm ``module`` as ``y = k * x + b`` per channel (float64)."""
        mean = self._take(f"{module}.running_mean")
        var = self._take(f"{module}.running_var")
        scale = self._take(f"{module}.weight") if f"{module}.weight" in self.state else 1.0
        shift = self._take(f"{module}.bias") if f"{module}.bias" in self.state else 0.0
        k = scale / np.sqrt(var + self.settings[module]["epsilon"])
        return k, shift - mean * k

    def conv_bn(self, x: str, conv: str, norm: str) -> str:
        """Convolution ``conv`` with the BatchNorm ``norm`` that follows it folded in."""
        k, b = self._norm(norm)
        weight = self._take(f"{conv}.weight") * k[:, None, None, None]
        kernel = list(weight.shape[2:])
        return self.node(
            "Conv",
            [x, self.constant(f"{conv}.weight", weight), self.constant(f"{conv}.bias", b)],
            conv,
            kernel_shape=kernel,
            **self.settings[conv],
        )

    def batch_norm(self, x: str, module: str) -> str:
        """A BatchNorm that precedes a convolution, as a BatchNormalization node."""
        inputs = [x] + [
            self.constant(f"{module}.{key}", self._take(f"{module}.{key}"))
            for key in ("weight", "bias", "running_mean", "running_var")
        ]
        return self.node(
            "BatchNormalization", inputs, module, epsilon=self.settings[module]["epsilon"]
        )

    def prelu(self, x: str, module: str) -> str:
        slope = self._take(f"{module}.weight")
        return self.node(
            "PRelu", [x, self.constant(f"{module}.weight", slope[:, None, None])], module
        )

    def add(self, a: str, b: str, name: str) -> str:
        return self.node("Add", [a, b], name)

    def take(self, key: str) -> np.ndarray:
        """The tensor ``key`` in float64, marked as used (for a wiring that splits or rescales
        a weight before emitting it, e.g. a fused query/key/value projection)."""
        return self._take(key)

    def skip(self, key: str) -> None:
        """Marks ``key`` as deliberately absent from the graph: a tensor only training reads
        (e.g. the ViT's mask token), which inference never touches."""
        self._take(key)

    def conv(self, x: str, module: str) -> str:
        """Convolution ``module`` with its own bias (no BatchNorm after it)."""
        weight = self._take(f"{module}.weight")
        inputs = [x, self.constant(f"{module}.weight", weight)]
        if f"{module}.bias" in self.state:
            inputs.append(self.constant(f"{module}.bias", self._take(f"{module}.bias")))
        return self.node(
            "Conv", inputs, module, kernel_shape=list(weight.shape[2:]), **self.settings[module]
        )

    def layer_norm(self, x: str, module: str) -> str:
        """LayerNorm ``module`` over the last axis (``LayerNormalization``, opset 17, which
        computes in float32 like the Flax module)."""
        inputs = [x] + [
            self.constant(f"{module}.{key}", self._take(f"{module}.{key}"))
            for key in ("weight", "bias")
        ]
        return self.node(
            "LayerNormalization", inputs, module, axis=-1, epsilon=self.settings[module]["epsilon"]
        )

    def matmul(self, x: str, weight: np.ndarray, name: str, bias: np.ndarray | None = None) -> str:
        """``x @ weight (+ bias)`` over the last axis of ``x`` of any rank; ``weight`` is
        (in, out). ``MatMul`` (and ``Add``) rather than ``Gemm``, which takes 2-D inputs only."""
        y = self.node(
            "MatMul",
            [x, self.constant(f"{name}.weight", weight)],
            name if bias is None else f"{name}.matmul",
        )
        if bias is None:
            return y
        return self.node("Add", [y, self.constant(f"{name}.bias", bias)], name)

    def linear(self, x: str, module: str) -> str:
        """PyTorch Linear ``module`` (weight (out, in), optional bias) over the last axis."""
        bias = self._take(f"{module}.bias") if f"{module}.bias" in self.state else None
        return self.matmul(x, self._take(f"{module}.weight").T, module, bias)

    def add_tensor(self, x: str, key: str) -> str:
        """``x + state[key]`` (broadcast; e.g. a learned positional embedding)."""
        return self.node("Add", [x, self.constant(key, self._take(key))], f"{key}.add")

    def reshape(self, x: str, shape: list[int], name: str) -> str:
        """Reshape to ``shape`` (ONNX rules: 0 keeps that input dimension, -1 is inferred), so
        the batch dimension stays dynamic."""
        return self.node(
            "Reshape", [x, self.constant(f"{name}.shape", np.array(shape), np.int64)], name
        )

    def transpose(self, x: str, perm: list[int], name: str) -> str:
        return self.node("Transpose", [x], name, perm=list(perm))

    def softmax(self, x: str, name: str) -> str:
        """Softmax over the last axis."""
        return self.node("Softmax", [x], name, axis=-1)

    def relu6(self, x: str, name: str) -> str:
        """``min(max(x, 0), 6)`` as ``Clip`` (PyTorch's ReLU6)."""
        return self.node(
            "Clip",
            [
                x,
                self.constant(f"{name}.min", np.array(0.0)),
                self.constant(f"{name}.max", np.array(6.0)),
            ],
            name,
        )

    def linear_bn(self, x: str, linear: str, norm: str, *, flatten: bool = True) -> str:
        """Flatten (all but the batch axis, in the input's memory order; skipped with
        ``flatten=False`` for a 2-D input), then the Linear ``linear`` with the BatchNorm1d
        ``norm`` folded in."""
        if flatten:
            x = self.node("Flatten", [x], f"{linear}.flatten", axis=1)
        k, b = self._norm(norm)
        weight = self._take(f"{linear}.weight") * k[:, None]
        if f"{linear}.bias" in self.state:
            b = b + self._take(f"{linear}.bias") * k
        return self.node(
            "Gemm",
            [x, self.constant(f"{linear}.weight", weight), self.constant(f"{linear}.bias", b)],
            linear,
            transB=1,
        )


def _input_convention(spec: Mapping) -> str:
    if dict(spec) == INSIGHTFACE_DEFAULT_SPEC:
        return (
            "RGB, (x - 127.5) / 127.5 of 0..255 values, applied by the caller "
            "(insightface's default); no preprocessing in the graph"
        )
    flip = "flips RGB to BGR, then " if spec["channel_order"] == "BGR" else ""
    return (
        f"RGB 0..255 values as float32; the graph {flip}computes (x/255 - {spec['mean']}) / "
        f"{spec['std']} (nodes Sub_mean, Mul_scale: insightface feeds raw 0..255)"
    )


def onnx_model(
    variables: Any,
    arch: str,
    input_spec: Mapping,
    *,
    meta: Mapping | None = None,
    check: bool = True,
):
    """The ``onnx.ModelProto`` of backbone ``variables`` of ``arch`` whose weights expect
    ``input_spec`` (see the module docstring for the graph's input and output). ``check``:
    run ``onnx.checker`` on it here, unless its weights reach :data:`EXTERNAL_DATA_THRESHOLD`
    (the checker takes such a model by path only: :func:`save_onnx` checks it)."""
    onnx = _import_onnx()
    spec = {
        "channel_order": input_spec["channel_order"],
        "mean": float(input_spec["mean"]),
        "std": float(input_spec["std"]),
    }
    if spec["channel_order"] not in ("RGB", "BGR") or spec["std"] <= 0:
        raise UserError(
            f"input_spec {dict(input_spec)}: expected channel_order RGB or BGR and std > 0"
        )
    variables = jax.tree.map(np.asarray, variables)
    state = convert.to_state_dict(variables, arch)
    g = GraphBuilder(state, _layer_settings(arch, variables))
    x = INPUT_NAME
    if spec != INSIGHTFACE_DEFAULT_SPEC:
        # insightface's ArcFaceONNX looks for Sub* and Mul* among the first eight nodes and then
        # feeds RGB 0..255: flip to the model's channel order and normalise here.
        if spec["channel_order"] == "BGR":
            indices = g.constant("bgr_indices", np.array([2, 1, 0]), np.int64)
            x = g.node("Gather", [x, indices], "Gather_rgb_to_bgr", axis=1)
        x = g.node("Sub", [x, g.constant("input_mean", np.array(255.0 * spec["mean"]))], "Sub_mean")
        x = g.node(
            "Mul",
            [x, g.constant("input_scale", np.array(1.0 / (255.0 * spec["std"])))],
            "Mul_scale",
        )
    embedding = models.arch_spec(arch).layout.onnx(g, x)
    if g.unused:
        raise AssertionError(f"ONNX export of {arch} left tensors unused: {sorted(g.unused)[:5]}")
    assert g.nodes[-1].output[0] == embedding  # the embedding Linear writes the graph output
    g.nodes[-1].output[0] = OUTPUT_NAME
    dim = convert.embedding_dim_of_variables(variables, arch)
    graph = onnx.helper.make_graph(
        g.nodes,
        f"magjax_{arch}",
        [
            onnx.helper.make_tensor_value_info(
                INPUT_NAME, onnx.TensorProto.FLOAT, ["N", 3, *models.INPUT_SHAPE[:2]]
            )
        ],
        [onnx.helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT, ["N", dim])],
    )
    model = onnx.helper.make_model(
        graph,
        producer_name="magjax",
        ir_version=IR_VERSION,
        opset_imports=[onnx.helper.make_opsetid("", OPSET)],
    )
    # The weights go into the model one tensor at a time, each dropped once copied:
    # make_graph(initializer=) and make_model copy them each, which held three copies of the
    # weights at once (9 GB for vit_h's 3 GB).
    for i, tensor in enumerate(g.initializers):
        model.graph.initializer.append(tensor)
        g.initializers[i] = None
    properties = {
        "magjax_arch": arch,
        "magjax_family": models.family(arch),
        "magjax_input_spec": json.dumps(spec, sort_keys=True),
        "input_convention": _input_convention(spec),
        "embedding": "raw embedding [N, d]; its L2 norm is the quality score",
        **{
            f"magjax_{k}": json.dumps(v)
            for k, v in (meta or {}).items()
            if k in ("trained_with", "step", "converted_from")
        },
    }
    onnx.helper.set_model_props(model, properties)
    if check and weight_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        onnx.checker.check_model(model)
    return model


def weight_bytes(model) -> int:
    """Bytes of the initializers of ``model`` (an ``onnx.ModelProto``), from their shapes and
    types: ``ByteSize()`` would serialise the whole model to count them (and fails past 2 GiB)."""
    onnx = _import_onnx()
    return sum(
        math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in model.graph.initializer
    )


def external_data_path(out: str | pathlib.Path) -> pathlib.Path:
    """Where the weights of a model too large for one protobuf go: ``model.onnx.data`` beside
    ``model.onnx`` (the graph names it relative to its own directory)."""
    out = pathlib.Path(out)
    return out.with_name(f"{out.name}.data")


def save_onnx(model, out: str | pathlib.Path) -> pathlib.Path | None:
    """Checks ``model`` with ``onnx.checker`` and writes it to ``out``, whole or not at all.

    A model whose weights take less than :data:`EXTERNAL_DATA_THRESHOLD` bytes (every arch but
    vit_h) is one self-contained file, serialised once for both the check and the write; a
    stale :func:`external_data_path` file of an earlier, larger export to ``out`` is removed.
    A larger one is saved with ONNX external data, all weights in one file,
    :func:`external_data_path` (returned), which must stay beside ``out`` under its name: load
    it by path (``onnxruntime.InferenceSession(path)``, insightface's ``get_model(path)``,
    ``onnx.load(path)``); from bytes the weights cannot be found. The check then reads the
    file (``onnx.checker`` takes a model of 2 GiB or more by path only), and the save moves
    the weights out of ``model`` into the file (``onnx.save_model`` clears them in the proto),
    so ``model`` cannot be saved again. Both files are written beside ``out`` first and moved
    into place, ``out`` last (:func:`magjax.files.write_together_atomically`)."""
    onnx = _import_onnx()
    out = pathlib.Path(out)
    data = external_data_path(out)
    if weight_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        serialized = model.SerializeToString()
        onnx.checker.check_model(serialized)
        files.write_atomically(out, lambda path: pathlib.Path(path).write_bytes(serialized))
        data.unlink(missing_ok=True)
        return None

    def write(directory: pathlib.Path) -> None:
        onnx.save_model(
            model,
            directory / out.name,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
        )
        onnx.checker.check_model(directory / out.name)

    files.write_together_atomically([data, out], write)
    return data


def export_onnx(
    workdir: str | pathlib.Path, out: str | pathlib.Path, *, best: bool = False
) -> tuple[dict, pathlib.Path | None]:
    """Writes the ONNX model of ``workdir`` to ``out`` (:func:`save_onnx`); returns its
    metadata properties and its external-data file (None: ``out`` is self-contained)."""
    variables, meta = load_model(workdir, best=best)
    spec = meta.get("input_spec") or models.input_spec(meta["arch"])
    model = onnx_model(variables, meta["arch"], spec, meta=meta, check=False)  # save_onnx does
    del variables  # the weights are in the model now (3 GB for vit_h)
    props = {p.key: p.value for p in model.metadata_props}
    return props, save_onnx(model, out)


# -------------------------------------------------------------------------------- PyTorch


def official_checkpoint(state: Mapping[str, Any], family: str, arch: str) -> dict:
    """Wraps a bare backbone ``state_dict`` the way ``family``'s repository saves it (the
    layout ``magjax.convert`` reads back)."""
    if family == "arcface_torch":
        return dict(state)
    if family == "magface":
        # MagFace's trainer saves the DataParallel SoftmaxBuilder; its inference loader strips
        # module.features. and builds the net named by "arch".
        return {
            "arch": arch.removeprefix("magface_"),
            "state_dict": {f"module.features.{k}": v for k, v in state.items()},
        }
    return {"state_dict": {f"model.{k}": v for k, v in state.items()}}


def export_torch(
    workdir: str | pathlib.Path, family: str, out: str | pathlib.Path, *, best: bool = False
) -> dict:
    """Writes the model of ``workdir`` as an official ``family`` PyTorch checkpoint to ``out``;
    returns the model's meta."""
    variables, meta = load_model(workdir, best=best)
    arch = meta["arch"]
    if arch in models.DEMO_ARCHS:
        raise UserError(
            f"{workdir}: {arch} is magjax's demo net; no official repository has it "
            "(use the ONNX export)"
        )
    if models.family(arch) != family:
        raise UserError(
            f"{workdir}: arch {arch!r} belongs to family {models.family(arch)!r}, not --to {family}"
        )
    torch = convert._import_torch()  # only once the model is known to have the layout
    state = {
        k: torch.from_numpy(np.array(v, order="C"))  # (ascontiguousarray makes 0-d 1-d)
        for k, v in convert.to_state_dict(jax.tree.map(np.asarray, variables), arch).items()
    }
    checkpoint_dict = official_checkpoint(state, family, arch)
    files.write_atomically(out, lambda path: torch.save(checkpoint_dict, path))
    return meta


def main(argv: list[str]) -> int:
    parser = cli.ArgumentParser(
        prog="python -m magjax.export",
        description="Export a magjax model to ONNX (insightface / onnxruntime) or to an official "
        "PyTorch checkpoint layout.",
        epilog="examples:\n"
        "  python -m magjax.export --workdir runs/demo --out demo.onnx\n"
        "  python -m magjax.export --workdir runs/r100 --best --to arcface_torch "
        "--out backbone.pth",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workdir",
        required=True,
        help="training workdir (its model/) or inference-model directory",
    )
    parser.add_argument(
        "--best",
        action="store_true",
        help="export the training workdir's model_best/ instead of model/",
    )
    parser.add_argument(
        "--to",
        choices=convert.SOURCES,
        help="write this official PyTorch checkpoint layout instead of ONNX",
    )
    parser.add_argument("--out", required=True, help="output file (.onnx, or .pth/.ckpt)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    cli.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    logs.route_logging(None, verbose=args.verbose)
    return cli.run(lambda: _export(args), verbose=args.verbose)


def _export(args: argparse.Namespace) -> None:
    if os.path.exists(args.out) and not args.overwrite:
        raise UserError(f"--out {args.out} already exists; pass --overwrite to replace it")
    data = external_data_path(args.out)
    if not args.to and data.exists() and not args.overwrite:
        # Whether this export needs it is known only once the model is built; either way a
        # rerun must not replace (or leave beside a new self-contained file) earlier weights.
        raise UserError(
            f"{data} (the weights of an earlier export to --out {args.out}) already "
            "exists; pass --overwrite to replace it"
        )
    logs.start_jax(verbose=args.verbose)
    if args.to:
        meta = export_torch(args.workdir, args.to, args.out, best=args.best)
        print(f"wrote {args.out}: {meta['arch']} in the {args.to} checkpoint layout")
    else:
        props, data = export_onnx(args.workdir, args.out, best=args.best)
        size = os.path.getsize(args.out) / 2**20
        weights = (
            ""
            if data is None
            else (
                f" and its weights {data} ({os.path.getsize(data) / 2**20:.1f} MiB; ONNX external "
                "data: keep it beside the .onnx under this name, load the .onnx by path)"
            )
        )
        print(
            f"wrote {args.out} ({size:.1f} MiB){weights}: {props['magjax_arch']}, input "
            f"{props['input_convention']}"
        )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
