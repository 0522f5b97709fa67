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

Why the graph is written with ``onnx.helper`` rather than a JAX exporter: ``jax2onnx``, the
maintained one, requires orbax-checkpoint < 0.11.37, which conflicts with magjax's pinned 0.12.8
(docs/jax-stack.md, ONNX). The backbones are few and plain (conv, BatchNorm, PReLU, add,
max-pool shortcut, flatten, linear), so the graph is emitted from the PyTorch-layout tensors of
``magjax.convert.to_state_dict`` (OIHW convolutions, the (C, H, W) flatten order ONNX uses too).
Per-layer settings (strides, paddings, groups, BatchNorm epsilon) are read off the Flax modules
themselves during an abstract forward pass, so only the wiring is written here. A BatchNorm that
follows a convolution or the embedding Linear is folded into it (in float64); the pre-activation
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
import os
import pathlib
import sys
from collections.abc import Callable, Mapping
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
        raise UserError(f"{workdir}: model.json names arch {meta.get('arch')!r}; expected one "
                        f"of {', '.join(models.ARCHS)}")
    return variables, meta


# ----------------------------------------------------------------------------------- ONNX


def _import_onnx():
    try:
        import onnx
        import onnx.helper
        import onnx.numpy_helper
    except ImportError as error:
        raise UserError("the ONNX export needs onnx; install it with `pip install -r "
                        "requirements-export.txt`") from error
    return onnx


def _layer_settings(arch: str, variables: Any) -> dict[str, dict]:
    """Strides, paddings and groups of every convolution and the epsilon of every BatchNorm of
    ``arch``, keyed by the PyTorch module name (``layer1.0.conv1``), read from the Flax modules
    during an abstract forward pass."""
    embedding_dim = convert.embedding_dim_of_variables(variables)
    model = models.build(arch, embedding_dim=embedding_dim)
    settings = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, nn.Conv | nn.BatchNorm):
            name = convert.torch_module_name(module.path)
            if isinstance(module, nn.Conv):
                settings[name] = {
                    "strides": list(module.strides),
                    "pads": [p[0] for p in module.padding] + [p[1] for p in module.padding],
                    "group": module.feature_group_count,
                }
            else:
                settings[name] = {"epsilon": module.epsilon}
        return next_fun(*args, **kwargs)

    images = jax.ShapeDtypeStruct((1, *models.INPUT_SHAPE), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    return settings


class _GraphBuilder:
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
        return self.node("Conv", [x, self.constant(f"{conv}.weight", weight),
                                  self.constant(f"{conv}.bias", b)],
                         conv, kernel_shape=kernel, **self.settings[conv])

    def batch_norm(self, x: str, module: str) -> str:
        """A BatchNorm that precedes a convolution, as a BatchNormalization node."""
        inputs = [x] + [self.constant(f"{module}.{key}", self._take(f"{module}.{key}"))
                        for key in ("weight", "bias", "running_mean", "running_var")]
        return self.node("BatchNormalization", inputs, module,
                         epsilon=self.settings[module]["epsilon"])

    def prelu(self, x: str, module: str) -> str:
        slope = self._take(f"{module}.weight")
        return self.node("PRelu", [x, self.constant(f"{module}.weight",
                                                    slope[:, None, None])], module)

    def add(self, a: str, b: str, name: str) -> str:
        return self.node("Add", [a, b], name)

    def linear_bn(self, x: str, linear: str, norm: str) -> str:
        """Flatten, then the Linear ``linear`` with the BatchNorm1d ``norm`` folded in."""
        x = self.node("Flatten", [x], f"{linear}.flatten", axis=1)
        k, b = self._norm(norm)
        weight = self._take(f"{linear}.weight") * k[:, None]
        if f"{linear}.bias" in self.state:
            b = b + self._take(f"{linear}.bias") * k
        return self.node("Gemm", [x, self.constant(f"{linear}.weight", weight),
                                  self.constant(f"{linear}.bias", b)], linear, transB=1)


def _iresnet(g: _GraphBuilder, x: str) -> str:
    """arcface_torch / MagFace iresnet (and the demo nets)."""
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


def _adaface_ir(g: _GraphBuilder, x: str) -> str:
    """AdaFace IR: units with a conv1x1+BN or a MaxPool2d(1, stride) shortcut."""
    x = g.prelu(g.conv_bn(x, "input_layer.0", "input_layer.1"), "input_layer.2")
    unit = 0
    while g.has_prefix(p := f"body.{unit}"):
        if g.has(f"{p}.shortcut_layer.0"):
            shortcut = g.conv_bn(x, f"{p}.shortcut_layer.0", f"{p}.shortcut_layer.1")
        elif (stride := g.settings[f"{p}.res_layer.4"]["strides"]) != [1, 1]:
            shortcut = g.node("MaxPool", [x], f"{p}.shortcut_layer", kernel_shape=[1, 1],
                              strides=stride)
        else:
            shortcut = x
        res = g.conv_bn(g.batch_norm(x, f"{p}.res_layer.0"), f"{p}.res_layer.1",
                        f"{p}.res_layer.2")
        res = g.conv_bn(g.prelu(res, f"{p}.res_layer.3"), f"{p}.res_layer.4", f"{p}.res_layer.5")
        x = g.add(res, shortcut, f"{p}.add")
        unit += 1
    return g.linear_bn(g.batch_norm(x, "output_layer.0"), "output_layer.3", "output_layer.4")


def _mobilefacenet(g: _GraphBuilder, x: str) -> str:
    """arcface_torch mbf: ConvBlock / DepthWise / Residual stages, conv_sep, GDC head."""

    def conv_block(x, p):  # conv -> BN (-> PReLU), a Sequential under p.layers
        x = g.conv_bn(x, f"{p}.layers.0", f"{p}.layers.1")
        return g.prelu(x, f"{p}.layers.2") if g.has(f"{p}.layers.2") else x

    def depthwise(x, p, residual):  # three ConvBlocks under p.layers
        out = x
        for index in range(3):
            out = conv_block(out, f"{p}.layers.{index}")
        return g.add(x, out, f"{p}.add") if residual else out

    stage = 0
    while g.has_prefix(p := f"layers.{stage}"):
        if g.has(f"{p}.layers.0"):
            x = conv_block(x, p)
        elif g.has(f"{p}.layers.0.layers.0"):
            x = depthwise(x, p, residual=False)
        else:  # Residual: DepthWise units under p.layers
            unit = 0
            while g.has_prefix(f"{p}.layers.{unit}"):
                x = depthwise(x, f"{p}.layers.{unit}", residual=True)
                unit += 1
        stage += 1
    x = conv_block(x, "conv_sep")
    x = conv_block(x, "features.layers.0")
    return g.linear_bn(x, "features.layers.2", "features.layers.3")


def _wiring(arch: str) -> Callable[[_GraphBuilder, str], str]:
    if arch == "mbf":
        return _mobilefacenet
    return _adaface_ir if models.family(arch) == "adaface" else _iresnet


def _input_convention(spec: Mapping) -> str:
    if dict(spec) == INSIGHTFACE_DEFAULT_SPEC:
        return ("RGB, (x - 127.5) / 127.5 of 0..255 values, applied by the caller "
                "(insightface's default); no preprocessing in the graph")
    flip = "flips RGB to BGR, then " if spec["channel_order"] == "BGR" else ""
    return (f"RGB 0..255 values as float32; the graph {flip}computes (x/255 - {spec['mean']}) / "
            f"{spec['std']} (nodes Sub_mean, Mul_scale: insightface feeds raw 0..255)")


def onnx_model(variables: Any, arch: str, input_spec: Mapping, *, meta: Mapping | None = None):
    """The ``onnx.ModelProto`` of backbone ``variables`` of ``arch`` whose weights expect
    ``input_spec`` (see the module docstring for the graph's input and output)."""
    onnx = _import_onnx()
    spec = {"channel_order": input_spec["channel_order"], "mean": float(input_spec["mean"]),
            "std": float(input_spec["std"])}
    if spec["channel_order"] not in ("RGB", "BGR") or spec["std"] <= 0:
        raise UserError(f"input_spec {dict(input_spec)}: expected channel_order RGB or BGR "
                        "and std > 0")
    variables = jax.tree.map(np.asarray, variables)
    state = convert.to_state_dict(variables, arch)
    g = _GraphBuilder(state, _layer_settings(arch, variables))
    x = INPUT_NAME
    if spec != INSIGHTFACE_DEFAULT_SPEC:
        # insightface's ArcFaceONNX looks for Sub* and Mul* among the first eight nodes and then
        # feeds RGB 0..255: flip to the model's channel order and normalise here.
        if spec["channel_order"] == "BGR":
            indices = g.constant("bgr_indices", np.array([2, 1, 0]), np.int64)
            x = g.node("Gather", [x, indices], "Gather_rgb_to_bgr", axis=1)
        x = g.node("Sub", [x, g.constant("input_mean", np.array(255.0 * spec["mean"]))],
                   "Sub_mean")
        x = g.node("Mul", [x, g.constant("input_scale", np.array(1.0 / (255.0 * spec["std"])))],
                   "Mul_scale")
    embedding = _wiring(arch)(g, x)
    if g.unused:
        raise AssertionError(f"ONNX export of {arch} left tensors unused: {sorted(g.unused)[:5]}")
    assert g.nodes[-1].output[0] == embedding  # the embedding Linear writes the graph output
    g.nodes[-1].output[0] = OUTPUT_NAME
    dim = convert.embedding_dim_of_variables(variables)
    graph = onnx.helper.make_graph(
        g.nodes, f"magjax_{arch}",
        [onnx.helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT,
                                            ["N", 3, *models.INPUT_SHAPE[:2]])],
        [onnx.helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT, ["N", dim])],
        initializer=g.initializers,
    )
    model = onnx.helper.make_model(graph, producer_name="magjax", ir_version=IR_VERSION,
                                   opset_imports=[onnx.helper.make_opsetid("", OPSET)])
    properties = {
        "magjax_arch": arch,
        "magjax_family": models.family(arch),
        "magjax_input_spec": json.dumps(spec, sort_keys=True),
        "input_convention": _input_convention(spec),
        "embedding": "raw embedding [N, d]; its L2 norm is the quality score",
        **{f"magjax_{k}": json.dumps(v) for k, v in (meta or {}).items()
           if k in ("trained_with", "step", "converted_from")},
    }
    onnx.helper.set_model_props(model, properties)
    onnx.checker.check_model(model)
    return model


def export_onnx(workdir: str | pathlib.Path, out: str | pathlib.Path, *,
                best: bool = False) -> dict:
    """Writes the ONNX model of ``workdir`` to ``out``; returns its metadata properties."""
    onnx = _import_onnx()
    variables, meta = load_model(workdir, best=best)
    spec = meta.get("input_spec") or models.input_spec(meta["arch"])
    model = onnx_model(variables, meta["arch"], spec, meta=meta)
    files.write_atomically(out, lambda path: onnx.save(model, path))
    return {p.key: p.value for p in model.metadata_props}


# -------------------------------------------------------------------------------- PyTorch


def official_checkpoint(state: Mapping[str, Any], family: str, arch: str) -> dict:
    """Wraps a bare backbone ``state_dict`` the way ``family``'s repository saves it (the
    layout ``magjax.convert`` reads back)."""
    if family == "arcface_torch":
        return dict(state)
    if family == "magface":
        # MagFace's trainer saves the DataParallel SoftmaxBuilder; its inference loader strips
        # module.features. and builds the net named by "arch".
        return {"arch": arch.removeprefix("magface_"),
                "state_dict": {f"module.features.{k}": v for k, v in state.items()}}
    return {"state_dict": {f"model.{k}": v for k, v in state.items()}}


def export_torch(workdir: str | pathlib.Path, family: str, out: str | pathlib.Path, *,
                 best: bool = False) -> dict:
    """Writes the model of ``workdir`` as an official ``family`` PyTorch checkpoint to ``out``;
    returns the model's meta."""
    variables, meta = load_model(workdir, best=best)
    arch = meta["arch"]
    if arch in models.DEMO_ARCHS:
        raise UserError(f"{workdir}: {arch} is magjax's demo net; no official repository has it "
                        "(use the ONNX export)")
    if models.family(arch) != family:
        raise UserError(f"{workdir}: arch {arch!r} belongs to family "
                        f"{models.family(arch)!r}, not --to {family}")
    torch = convert._import_torch()  # only once the model is known to have the layout
    state = {k: torch.from_numpy(np.array(v, order="C"))  # (ascontiguousarray makes 0-d 1-d)
             for k, v in convert.to_state_dict(jax.tree.map(np.asarray, variables), arch).items()}
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
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True,
                        help="training workdir (its model/) or inference-model directory")
    parser.add_argument("--best", action="store_true",
                        help="export the training workdir's model_best/ instead of model/")
    parser.add_argument("--to", choices=convert.SOURCES,
                        help="write this official PyTorch checkpoint layout instead of ONNX")
    parser.add_argument("--out", required=True, help="output file (.onnx, or .pth/.ckpt)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    cli.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    logs.route_logging(None, verbose=args.verbose)
    return cli.run(lambda: _export(args), verbose=args.verbose)


def _export(args: argparse.Namespace) -> None:
    if os.path.exists(args.out) and not args.overwrite:
        raise UserError(f"--out {args.out} already exists; pass --overwrite to replace it")
    logs.start_jax(verbose=args.verbose)
    if args.to:
        meta = export_torch(args.workdir, args.to, args.out, best=args.best)
        print(f"wrote {args.out}: {meta['arch']} in the {args.to} checkpoint layout")
    else:
        props = export_onnx(args.workdir, args.out, best=args.best)
        size = os.path.getsize(args.out) / 2**20
        print(f"wrote {args.out} ({size:.1f} MiB): {props['magjax_arch']}, input "
              f"{props['input_convention']}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
