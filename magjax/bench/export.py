"""``python -m magjax.bench export --arch ARCH``: the exported ONNX model against JAX.

Exports random weights of ``ARCH`` with ``magjax.export.onnx_model`` and reports, in the same
run: the ONNX file size, and the inference latency per image at each ``--batches`` size of
onnxruntime's CPU provider and of the jitted JAX forward (``train=False``, float32), as the median
over ``--steps`` timed calls after one warm-up call (compilation / session set-up). Both see the
same normalised NCHW/NHWC input; neither includes image decoding or preprocessing.

The last printed line is JSON: ``arch, onnx_bytes, cpus, ort_threads, load_average_start/end``
and per batch B ``ort_ms_per_image_bB``, ``jax_ms_per_image_bB``. On a shared machine the load
average tells whether the figures were taken under contention.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from magjax import bench, cli, export, models


def random_variables(arch: str) -> dict:
    """Fan-in scaled random weights of ``arch`` (latency does not depend on the values)."""
    module = models.build(arch)
    shapes = jax.eval_shape(
        lambda k: module.init(k, jnp.zeros((1, *models.INPUT_SHAPE)), train=False),
        jax.random.key(0),
    )
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        if leaf.ndim >= 2:
            return rng.normal(0, np.sqrt(1 / np.prod(leaf.shape[:-1])), leaf.shape)
        return (
            np.ones(leaf.shape)
            if "var" in jax.tree_util.keystr(path)
            else 0.1 * rng.normal(size=leaf.shape)
        )

    return jax.tree_util.tree_map_with_path(lambda p, x: fill(p, x).astype(np.float32), shapes)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m magjax.bench export", description=__doc__)
    cli.add_arch_argument(parser, models.ARCHS, "--arch", default="iresnet50")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--steps", type=int, default=5, help="timed calls per batch (median)")
    args = parser.parse_args(argv)
    import onnxruntime

    result = {"arch": args.arch, "cpus": os.cpu_count(), "load_average_start": os.getloadavg()[0]}
    variables = random_variables(args.arch)
    spec = export.INSIGHTFACE_DEFAULT_SPEC  # no preprocessing nodes: the backbone alone
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        # save_onnx: vit_h's weights exceed protobuf's 2 GiB and go to model.onnx.data.
        data = export.save_onnx(export.onnx_model(variables, args.arch, spec, check=False), path)
        result["onnx_bytes"] = os.path.getsize(path) + (data.stat().st_size if data else 0)
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    result["ort_threads"] = session.get_session_options().intra_op_num_threads or os.cpu_count()
    module = models.build(args.arch)
    forward = jax.jit(lambda v, x: module.apply(v, x, train=False))
    device_variables = jax.device_put(variables)
    rng = np.random.default_rng(1)
    for batch in args.batches:
        images = rng.uniform(-1, 1, (batch, *models.INPUT_SHAPE)).astype(np.float32)
        nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        device_images = jnp.asarray(images)
        ort_s = bench.median_seconds(lambda x=nchw: session.run(None, {"input": x}), args.steps)
        jax_s = bench.median_seconds(
            lambda x=device_images: jax.block_until_ready(forward(device_variables, x)), args.steps
        )
        result[f"ort_ms_per_image_b{batch}"] = 1e3 * ort_s / batch
        result[f"jax_ms_per_image_b{batch}"] = 1e3 * jax_s / batch
        print(
            f"{args.arch} batch {batch}: onnxruntime {1e3 * ort_s / batch:.2f} ms/image, "
            f"jax (jit) {1e3 * jax_s / batch:.2f} ms/image"
        )
    result["load_average_end"] = os.getloadavg()[0]
    print(f"ONNX file: {result['onnx_bytes'] / 2**20:.1f} MiB")
    print(json.dumps(result))
    return 0
