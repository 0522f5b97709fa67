"""``python -m magjax.bench backbone --arch ARCH --batch B``: backbone training throughput.

Times one training step of the backbone alone (forward in train mode with BatchNorm statistic
updates, backward, SGD-momentum update) under ``jax.jit`` after a warm-up, in images/s. In
the same run, when torch is installed, it times the same step of the PyTorch definition of
the architecture (``magjax.models.torch_reference``: forward, backward, ``torch.optim.SGD``
step) on the same CPU threads. The loss is a squared error of the raw embedding against a fixed
random target, so the head/loss cost is negligible next to the backbone.

``--convs`` also times each convolution of the architecture alone, at its place in the net and
the batch given, in JAX and in PyTorch: the forward, the input gradient (not for the stem, whose
input is the images: no step computes that one) and the weight gradient, each the median of
``--steps`` calls, so that a gap in the step can be traced to the layers where it arises.

The last printed line is JSON: ``arch, batch, dtype, steps, jax_step_ms, jax_images_per_s,
jax_cpu_s_per_step`` and, with torch, the same ``torch_*`` fields and ``torch_threads``; with
``--convs``, ``convolutions`` (one entry per convolution: its PyTorch module name, input
``[H, W, C]``, output channels, kernel, stride, groups and the ``jax_*_ms``/``torch_*_ms``
times) and the totals ``jax_conv_ms`` and ``torch_conv_ms``.
Timings on a shared machine are noisy: the median wall time per step is reported, with the
process CPU time per step (all threads) and the load average before and after, so that a
figure taken under contention can be told apart.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from magjax import convert, models

# The three passes of a convolution that training runs, as named in --convs' output.
CONV_PASSES = ("forward", "input_grad", "weight_grad")


def _time_steps(step, steps: int, warmup: int) -> tuple[float, float]:
    """Median wall seconds per step and mean process CPU seconds per step (all threads)."""
    for _ in range(warmup):
        step()
    times = []
    cpu_start = time.process_time()
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), (time.process_time() - cpu_start) / steps


def bench_jax(arch: str, batch: int, dtype: str, steps: int, warmup: int) -> tuple[float, float]:
    """(median wall seconds, CPU seconds) per jitted train step of the Flax backbone."""
    model = models.build(arch, dtype=jnp.dtype(dtype))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(batch, *models.INPUT_SHAPE)).astype(np.float32))
    target = jnp.asarray(rng.normal(size=(batch, 512)).astype(np.float32))
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images)
    tx = optax.sgd(0.1, momentum=0.9)
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

    @jax.jit
    def train_step(state, images, target, key):
        params, batch_stats, opt_state = state

        def loss_fn(params):
            emb, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": key},
            )
            return jnp.mean((emb - target) ** 2), updates["batch_stats"]

        grads, new_stats = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state

    holder = {"state": state, "key": jax.random.key(1)}

    def step():
        holder["key"], key = jax.random.split(holder["key"])
        holder["state"] = train_step(holder["state"], images, target, key)
        jax.block_until_ready(holder["state"])

    return _time_steps(step, steps, warmup)


def bench_torch(arch: str, batch: int, steps: int, warmup: int) -> tuple[float, float, int]:
    """(median wall seconds, CPU seconds) per train step of the PyTorch definition, and
    torch's thread count."""
    import torch

    from magjax.models.torch_reference import build_torch

    torch.manual_seed(0)
    model = build_torch(arch).train()
    images = torch.randn(batch, 3, *models.INPUT_SHAPE[:2])
    target = torch.randn(batch, 512)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], 0.1, 0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.mean((model(images) - target) ** 2)
        loss.backward()
        optimizer.step()

    return (*_time_steps(step, steps, warmup), torch.get_num_threads())


def flax_convolutions(arch: str, batch: int, dtype: str) -> dict:
    """Every convolution the Flax backbone runs, in call order: ``{PyTorch module name:
    (unbound nn.Conv, input ShapeDtypeStruct)}``, found by intercepting the modules' calls."""
    model = models.build(arch, dtype=jnp.dtype(dtype))
    found = {}

    def record(call, args, kwargs, context):
        if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
            found[convert.torch_module_name(context.module.path)] = (
                context.module.clone(parent=None),
                jax.ShapeDtypeStruct(args[0].shape, args[0].dtype),
            )
        return call(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(
            lambda x: model.init(jax.random.key(0), x, train=False),
            jax.ShapeDtypeStruct((batch, *models.INPUT_SHAPE), jnp.float32),
        )
    return found


def torch_convolutions(arch: str, batch: int) -> dict:
    """The same for the PyTorch definition: ``{module name: (nn.Conv2d, input shape NCHW)}``."""
    import torch

    from magjax.models.torch_reference import build_torch

    model = build_torch(arch).eval()  # the shapes are the same in either mode; any batch
    found = {}

    def recorder(name):
        def record(module, inputs, output):  # returns None: the output stays as it is
            found[name] = (module, tuple(inputs[0].shape))

        return record

    hooks = [
        module.register_forward_hook(recorder(name))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Conv2d)
    ]
    with torch.no_grad():
        model(torch.zeros(batch, 3, *models.INPUT_SHAPE[:2]))
    for hook in hooks:
        hook.remove()
    return found


def _time_jax_convolution(conv: nn.Conv, x_shape, steps: int, warmup: int) -> dict:
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], x_shape.shape, x_shape.dtype)
    params = conv.init(keys[1], x)["params"]

    def forward(x, params):
        return conv.apply({"params": params}, x)

    dy = jnp.ones_like(jax.eval_shape(forward, x, params))
    calls = {
        "forward": functools.partial(jax.jit(forward), x, params),
        "input_grad": functools.partial(
            jax.jit(lambda x, params, dy: jax.vjp(lambda x: forward(x, params), x)[1](dy)),
            x,
            params,
            dy,
        ),
        "weight_grad": functools.partial(
            jax.jit(lambda x, params, dy: jax.vjp(lambda p: forward(x, p), params)[1](dy)),
            x,
            params,
            dy,
        ),
    }
    if x_shape.shape[1:] == models.INPUT_SHAPE:
        del calls["input_grad"]  # the stem's input is the images: no step takes its gradient
    return {
        name: 1e3 * _time_steps(lambda call=call: jax.block_until_ready(call()), steps, warmup)[0]
        for name, call in calls.items()
    }


def _time_torch_convolution(conv, x_shape, passes, steps: int, warmup: int) -> dict:
    import torch
    from torch.nn import grad

    x = torch.randn(x_shape)
    options = dict(
        stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups
    )
    with torch.no_grad():
        dy = torch.ones_like(torch.nn.functional.conv2d(x, conv.weight, **options))
        calls = {
            "forward": lambda: torch.nn.functional.conv2d(x, conv.weight, **options),
            "input_grad": lambda: grad.conv2d_input(x.shape, conv.weight, dy, **options),
            "weight_grad": lambda: grad.conv2d_weight(x, conv.weight.shape, dy, **options),
        }
        return {name: 1e3 * _time_steps(calls[name], steps, warmup)[0] for name in passes}


def paired_convolutions(arch: str, batch: int, dtype: str, with_torch: bool) -> list[tuple]:
    """``(row, flax conv, input shape, (torch conv, input shape) or None)`` for each convolution,
    in the Flax net's call order, ``row`` describing it. The two nets' convolutions are matched
    by module name and must agree in input shape, output channels, kernel, stride and groups."""
    flax_convs = flax_convolutions(arch, batch, dtype)
    torch_convs = torch_convolutions(arch, batch) if with_torch else {}
    if with_torch and set(torch_convs) != set(flax_convs):
        raise RuntimeError(
            f"{arch}: the Flax and PyTorch nets have different convolutions "
            f"({sorted(set(flax_convs) ^ set(torch_convs))})"
        )
    pairs = []
    for name, (conv, x_shape) in flax_convs.items():
        n, h, w, channels = x_shape.shape
        kernel, stride = tuple(conv.kernel_size), tuple(conv.strides or (1, 1))
        torch_pair = torch_convs.get(name)
        if torch_pair:
            torch_conv, torch_shape = torch_pair
            expected = (
                (n, channels, h, w),
                conv.features,
                kernel,
                stride,
                conv.feature_group_count,
            )
            found = (
                torch_shape,
                torch_conv.out_channels,
                tuple(torch_conv.kernel_size),
                tuple(torch_conv.stride),
                torch_conv.groups,
            )
            if found != expected:
                raise RuntimeError(
                    f"{arch}: convolution {name} is {expected} (input NCHW, "
                    f"out channels, kernel, stride, groups) in Flax, {found} in "
                    "PyTorch"
                )
        row = {
            "name": name,
            "input": [h, w, channels],
            "out_channels": conv.features,
            "kernel": list(kernel),
            "stride": list(stride),
            "groups": conv.feature_group_count,
        }
        pairs.append((row, conv, x_shape, torch_pair))
    return pairs


def bench_convolutions(
    arch: str, batch: int, dtype: str, steps: int, warmup: int, with_torch: bool
) -> list[dict]:
    """Each convolution's passes timed alone, in JAX and (``with_torch``) PyTorch: the rows of
    :func:`paired_convolutions` with the ``jax_*_ms`` and ``torch_*_ms`` times added."""
    rows = []
    for row, conv, x_shape, torch_pair in paired_convolutions(arch, batch, dtype, with_torch):
        times = _time_jax_convolution(conv, x_shape, steps, warmup)
        row.update({f"jax_{p}_ms": round(ms, 3) for p, ms in times.items()})
        if torch_pair:
            torch_times = _time_torch_convolution(*torch_pair, times, steps, warmup)
            row.update({f"torch_{p}_ms": round(ms, 3) for p, ms in torch_times.items()})
        rows.append(row)
    return rows


def _print_convolutions(rows: list[dict], result: dict) -> None:
    frameworks = [f for f in ("jax", "torch") if f"{f}_forward_ms" in rows[0]]
    header = " | ".join(f"{f}: " + " ".join(f"{p:>11s}" for p in CONV_PASSES) for f in frameworks)
    print(f"{'convolution':24s} {'input HxWxC -> out, k, s':28s} {header}  (ms)")
    for row in rows:
        h, w, c = row["input"]
        shape = f"{h}x{w}x{c} -> {row['out_channels']}, k{row['kernel'][0]}, s{row['stride'][0]}"
        cells = " | ".join(
            f"{f}: "
            + " ".join(
                f"{row[f'{f}_{p}_ms']:11.2f}" if f"{f}_{p}_ms" in row else f"{'-':>11s}"
                for p in CONV_PASSES
            )
            for f in frameworks
        )
        print(f"{row['name']:24s} {shape:28s} {cells}")
    for framework in frameworks:
        total = sum(row.get(f"{framework}_{p}_ms", 0.0) for row in rows for p in CONV_PASSES)
        result[f"{framework}_conv_ms"] = round(total, 2)
        print(f"{framework} convolutions in all: {total:.1f} ms")
    result["convolutions"] = rows


def _record(result: dict, name: str, batch: int, wall: float, cpu: float, how: str) -> None:
    result.update(
        {
            f"{name}_step_ms": 1e3 * wall,
            f"{name}_images_per_s": batch / wall,
            f"{name}_cpu_s_per_step": cpu,
        }
    )
    print(
        f"{name:5s} {result['arch']} batch {batch}: {1e3 * wall:.1f} ms/step, "
        f"{batch / wall:.1f} images/s ({how}); {cpu:.2f} CPU-s/step over all threads"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m magjax.bench backbone", description=__doc__)
    parser.add_argument("--arch", default="iresnet50", choices=models.ARCHS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument(
        "--convs",
        action="store_true",
        help="also time each convolution's forward, input and weight gradients "
        "alone (JAX and PyTorch)",
    )
    args = parser.parse_args(argv)

    # The load average shows how much other work shared the cores during the run.
    result = {
        "arch": args.arch,
        "batch": args.batch,
        "dtype": args.dtype,
        "steps": args.steps,
        "cpus": os.cpu_count(),
        "load_average_start": os.getloadavg()[0],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }
    wall, cpu = bench_jax(args.arch, args.batch, args.dtype, args.steps, args.warmup)
    _record(result, "jax", args.batch, wall, cpu, f"{args.dtype}, forward + backward + SGD, jit")
    with_torch = not args.no_torch
    if with_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("torch not installed: PyTorch comparison skipped")
            with_torch = False
    if with_torch:
        wall, cpu, threads = bench_torch(args.arch, args.batch, args.steps, args.warmup)
        how = f"float32, forward + backward + SGD, eager, {threads} threads"
        _record(result, "torch", args.batch, wall, cpu, how)
        result["torch_threads"] = threads
    if args.convs:
        _print_convolutions(
            bench_convolutions(
                args.arch, args.batch, args.dtype, args.steps, args.warmup, with_torch
            ),
            result,
        )
    result["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(result))
    return 0
