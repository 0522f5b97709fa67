"""``python -m magjax.bench backbone --arch ARCH --batch B``: backbone training throughput.

Times one training step of the backbone alone (forward in train mode with BatchNorm statistic
updates, backward, SGD-momentum update) under ``jax.jit`` after a warm-up, in images/s. In
the same run, when torch is installed, it times the same step of the PyTorch definition of
the architecture (``magjax.models.torch_reference``: forward, backward, ``torch.optim.SGD``
step) on the same CPU threads. The loss is a squared error of the raw embedding against a fixed
random target, so the head/loss cost is negligible next to the backbone.

The last printed line is JSON: ``arch, batch, dtype, steps, jax_step_ms, jax_images_per_s,
jax_cpu_s_per_step`` and, with torch, the same ``torch_*`` fields and ``torch_threads``.
Timings on a shared machine are noisy: the median wall time per step is reported, with the
process CPU time per step (all threads) and the load average before and after, so that a
figure taken under contention can be told apart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from magjax import models


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
    if not args.no_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("torch not installed: PyTorch comparison skipped")
        else:
            wall, cpu, threads = bench_torch(args.arch, args.batch, args.steps, args.warmup)
            how = f"float32, forward + backward + SGD, eager, {threads} threads"
            _record(result, "torch", args.batch, wall, cpu, how)
            result["torch_threads"] = threads
    result["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(result))
    return 0
