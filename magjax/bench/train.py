"""``python -m magjax.bench train``: images per second of the whole train step, beside PyTorch.

    python -m magjax.bench train --arch iresnet50 --batch 256 --dtype bfloat16 --torch   # GPU
    python -m magjax.bench train --arch tiny --batch 32 --classes 1000 --dtype float32 --torch

Times the train step that ``python -m magjax.main`` runs (``train_step.build_components`` and
``train_step.jit_train_step`` of the loss's recipe: backbone, class-sharded margin head, optimizer
with the recipe's clipping and weight decay) over every local device, on synthetic batches that
stay on the devices, and reports the median images per second of ``--steps`` steps after
``--warmup``. With ``--torch`` it times, in the same run and on the same device (the first CUDA GPU
when there is one, else the CPU), the PyTorch step a user of arcface_torch runs: the
``magjax.models.torch_reference`` backbone (channels-last on a GPU), a full-softmax ArcFace head as
arcface_torch computes it (normalised centres, straight-through margin on the target cosine, scale
64, cross entropy), SGD with momentum 0.9 and weight decay 5e-4, the backbone's gradient norm
clipped at 5, under ``torch.autocast`` in bfloat16 when ``--dtype bfloat16``.

Nothing on this path imports the data or checkpoint stack (tfds, grain, array_record,
tensorstore), so it runs on a machine with only jax, flax, optax, numpy, ml-collections and
torch. The last line is JSON and names the device kind of each side.
"""

from __future__ import annotations

import argparse
import json

from magjax import bench


def bench_magjax(
    loss: str, arch: str, batch: int, classes: int, dtype: str, steps: int, warmup: int
) -> dict:
    """Median seconds per train step of magjax over all local devices, and their kind."""
    import jax
    import numpy as np

    from magjax import parallel, recipes, train_step

    config = recipes.get_config(loss)
    config.model.arch, config.model.dtype = arch, dtype
    config.global_batch, config.data.num_classes = batch, classes
    mesh = parallel.make_mesh()
    devices = mesh.shape[parallel.DATA_AXIS]
    if batch % devices:
        raise ValueError(f"--batch {batch} must be a multiple of the {devices} local devices")
    components = train_step.build_components(
        config, mesh, classes, steps_per_epoch=1000, total_steps=100_000
    )
    init_key, base_key = jax.random.split(jax.random.key(0))
    holder = {"state": train_step.init_state(components, init_key)}
    shardings = jax.tree.map(lambda leaf: leaf.sharding, holder["state"])
    train_step = train_step.jit_train_step(components, base_key, shardings)
    rng = np.random.default_rng(0)
    batch_on_devices = jax.device_put(
        {
            "image": rng.integers(0, 256, (batch, 112, 112, 3), dtype=np.uint8),
            "label": rng.integers(0, classes, (batch,), dtype=np.int32),
        },
        parallel.batch_sharding(mesh),
    )

    def step():
        holder["state"], metrics = train_step(holder["state"], batch_on_devices)
        jax.block_until_ready(metrics["loss"])

    seconds = bench.median_seconds(step, steps, warmup)
    return {
        "magjax_step_ms": 1e3 * seconds,
        "magjax_images_per_s": batch / seconds,
        "magjax_devices": devices,
        "magjax_device_kind": jax.devices()[0].device_kind,
    }


def bench_torch(arch: str, batch: int, classes: int, dtype: str, steps: int, warmup: int) -> dict:
    """Median seconds per arcface_torch-style train step in PyTorch on the first CUDA device
    (or the CPU), and its name."""
    import math

    import torch
    from torch.nn import functional

    from magjax.models.torch_reference import build_torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    # Channels-last is the fast layout of cuDNN's convolutions; on the CPU build (torch 2.13.0)
    # it crashes in the backward pass of these nets, so the CPU keeps the default layout.
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    backbone = build_torch(arch).to(device).to(memory_format=layout).train()
    centres = torch.nn.Parameter(0.01 * torch.randn(classes, 512, device=device))
    params = [p for p in backbone.parameters() if p.requires_grad] + [centres]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(batch, 3, 112, 112, device=device).to(memory_format=layout)
    labels = torch.randint(0, classes, (batch,), device=device)
    scale, margin = 64.0, 0.5
    rows = torch.arange(batch, device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            embeddings = backbone(images)
        # arcface_torch computes the head in float32: normalised features and centres, the
        # margin on the target cosine with a straight-through gradient, cross entropy.
        cosines = functional.linear(
            functional.normalize(embeddings.float()), functional.normalize(centres)
        )
        target = cosines[rows, labels].clamp(-1, 1)
        with torch.no_grad():
            shifted = torch.cos(torch.arccos(target) + margin) - target
        logits = cosines.clone()
        logits[rows, labels] = target + shifted
        loss = functional.cross_entropy(scale * logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), max_norm=5.0)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert math.isfinite(loss.item())

    seconds = bench.median_seconds(step, steps, warmup)
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "torch_step_ms": 1e3 * seconds,
        "torch_images_per_s": batch / seconds,
        "torch_device_kind": kind,
        "torch_version": torch.__version__,
    }


def main(argv: list[str]) -> int:
    from magjax import cli, losses, models

    parser = argparse.ArgumentParser(
        prog="python -m magjax.bench train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_arch_argument(parser, models.ARCHS, "--arch", default="iresnet50")
    parser.add_argument("--loss", default="arcface", choices=sorted(losses.registered()))
    parser.add_argument("--batch", type=int, default=256, help="global batch over all devices")
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation)")
    parser.add_argument(
        "--torch",
        action="store_true",
        help="also time the PyTorch step (arcface_torch-style) on the same device",
    )
    args = parser.parse_args(argv)

    result = {
        "arch": args.arch,
        "loss": args.loss,
        "batch": args.batch,
        "classes": args.classes,
        "dtype": args.dtype,
        "steps": args.steps,
    }
    result.update(
        bench_magjax(
            args.loss, args.arch, args.batch, args.classes, args.dtype, args.steps, args.warmup
        )
    )
    print(
        f"magjax {args.arch} {args.loss}: {result['magjax_step_ms']:.1f} ms/step, "
        f"{result['magjax_images_per_s']:.1f} images/s on {result['magjax_devices']} x "
        f"{result['magjax_device_kind']}"
    )
    if args.torch:
        result.update(
            bench_torch(args.arch, args.batch, args.classes, args.dtype, args.steps, args.warmup)
        )
        result["magjax_over_torch"] = result["magjax_images_per_s"] / result["torch_images_per_s"]
        print(
            f"torch  {args.arch} arcface: {result['torch_step_ms']:.1f} ms/step, "
            f"{result['torch_images_per_s']:.1f} images/s on {result['torch_device_kind']}"
        )
    print(json.dumps(result))
    return 0
