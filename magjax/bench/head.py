"""Margin-head benchmark: one forward+backward against the matrix-product floor, and memory.

    python -m magjax.bench head --batch 256 --classes 100000 --dim 512 --devices 1
    python -m magjax.bench head --abstract --classes 29000000 --devices 64 --sample-rate 0.1
    python -m magjax.bench head --sample-rate 0.1 --freeze-unsampled   # sampled-rows gradient
    python -m magjax.bench head --sample-rate 0.1 --update   # + the centres' optimizer update
    python -m magjax.bench head --block 4096   # head.block_size: the classes 4096 at a time
    python -m magjax.bench head --topology v5p:2x2x1 --batch 4096 --classes 20000000 --block 8192

The step is what training runs for the head, through the same code
(``head.ClassShardedHead.value_and_grad``; with ``--update``, ``ClassShardedHead.update``, which
the train step calls), the embeddings standing in for the backbone as its parameters:
all-gather of the embeddings, cosine logits per class shard, margin, softmax cross entropy over
shards, and the gradients with respect to the embeddings and the class centres. The floor,
measured in the same run on every device at the per-device shapes, is the three matrix
products no implementation can avoid: the logits
``[B, d] x [d, C_local]``, the embedding gradient ``[B, C_local] x [C_local, d]`` (summed over
the devices) and the centre gradient ``[C_local, B] x [B, d]`` (with Partial FC, ``C_local`` is
the sampled count), timed in the head's class-major layout and in the batch-major one, the
faster of the two counting. Fake CPU devices share the host's cores, so the floor runs on all of
them at once, as the step does. A dense centre gradient (Partial FC without
``--freeze-unsampled``, arcface_torch's semantics) must also write ``[C_local, d]`` floats, most
of them zeros: ``dense_write_ms`` times the cheapest such write (zeros, on every device), and
``ratio_with_dense_write`` compares the step with the floor plus that write.

``--update`` times the step as the train step runs it: the centre gradient is not returned but
consumed by the recipe's optimizer (``optim.make_optimizer``: weight decay, SGD with momentum),
which updates the centres and their momentum in place (donated; the embeddings too, as the
backbone's parameters, a ``[B, d]`` pass), every row with arcface_torch's
semantics, the sampled rows alone with ``--freeze-unsampled``. The floor then adds that update
with a zero gradient over the rows it must move (``update_floor_ms``): under arcface_torch's
semantics weight decay and momentum move every centre each step, a pass over ``[C_local, d]``
that no implementation avoids; with ``--freeze-unsampled``, the sampled count of rows, as one
contiguous block. ``sampled_rows_update_ms`` then times that update alone on the step's own
sampled rows where they lie in the centres and momentum (``ClassShardedHead.take`` and ``keep``:
gather, update, scatter back), the part of the step that the contiguous floor does not see.
Step and floors are timed in turn, best of ``--repeats`` each.
``bytes_per_device`` is XLA's compiled memory analysis (arguments + outputs + temporaries, less
the outputs that take donated arguments' buffers).
``--abstract`` compiles on shapes only (no allocation, no timing), so that millions of classes
over 8-512 devices can be sized on one machine; ``temp_bytes_per_device`` is the temporaries'
share (what the dense head's ``[C_local, B]`` arrays fill). ``--topology`` compiles on shapes
for the chips of a Cloud TPU topology (``v5p:2x2x1``; libtpu's compiler, no chip needed) and
adds XLA's FLOP count per chip. ``--block N`` runs the head that visits each shard's classes N
at a time (``head.block_size``; :mod:`magjax.losses.blocked`), ``--block 0`` the dense head;
without it, the head's own rule picks (``head.class_block_size``: dense while its logits take
at most half a device's memory; with ``--topology``, the chip's HBM), and the JSON's ``block``
says what it picked. A blocked head is timed in turn with the dense one (``dense_head_ms``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time


def _parse(argv):
    parser = argparse.ArgumentParser(
        prog="python -m magjax.bench head",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--sample-rate", type=float, default=1.0)
    parser.add_argument(
        "--freeze-unsampled",
        action="store_true",
        help="Partial FC as trained with head.freeze_unsampled: the gradient of "
        "the sampled rows alone (default: a dense [C, d] gradient)",
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="the step also applies the recipe optimizer's update to the centres "
        "and their momentum, as training does; the floor adds that update "
        "with a zero gradient",
    )
    # Any registered loss (magjax.losses): checked once jax is imported (after --devices).
    parser.add_argument("--loss", default="arcface", help="a loss of magjax.losses")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--abstract", action="store_true", help="compile on shapes only")
    parser.add_argument(
        "--block",
        type=int,
        default=None,
        metavar="N",
        help="head.block_size: each shard's classes N at a time; 0: the dense head; unset: "
        "the head's rule (dense while its logits take at most half a device's memory; with "
        "--topology, the chip's HBM)",
    )
    parser.add_argument(
        "--topology",
        default=None,
        help="compile on shapes for a Cloud TPU topology (e.g. v5p:2x2x1), "
        "its chips as the devices; implies --abstract",
    )
    parser.add_argument("--json", action="store_true", help="(the last line is always JSON)")
    args = parser.parse_args(argv)
    if args.block is not None and args.block < 0:
        parser.error(f"--block must be >= 1 (or 0: the dense head), got {args.block}")
    args.abstract = args.abstract or args.topology is not None
    return args


def _time_alternating(calls, repeats):
    """Best wall time in ms of each call (no arguments), the calls taken in turn so that all of
    them see the same machine (a shared VM's speed drifts between runs)."""
    import jax

    for call in calls:
        jax.block_until_ready(call())  # compile and warm up
    best = [float("inf")] * len(calls)
    for _ in range(repeats):
        for k, call in enumerate(calls):
            start = time.perf_counter()
            jax.block_until_ready(call())
            best[k] = min(best[k], time.perf_counter() - start)
    return [b * 1e3 for b in best]


def _carrying(fn, state: list, *args):
    """A call of ``fn(params, opt_state, *args) -> (params, opt_state, ...)``, whose first two
    arguments are donated: each call passes on the state the previous one returned, kept in
    ``state`` (``[params, opt_state]``, which calls built on the same list share)."""

    def call():
        out = fn(*state, *args)
        state[:] = out[:2]
        return out

    return call


def _memory(compiled) -> int:
    stats = compiled.memory_analysis()
    return int(
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


def main(argv: list[str]) -> int:
    args = _parse(argv)
    if args.devices > 1 and "jax" not in sys.modules and args.topology is None:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.devices}"
        )
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from magjax import cli, head, logs, losses, optim, recipes
    from magjax.bench import compile as compile_bench
    from magjax.errors import UserError

    logs.start_jax()  # once the device count is set: libtpu's probing off the console
    from magjax.parallel import DATA_AXIS, make_mesh, padded_size

    if args.topology is not None:
        try:
            chips = compile_bench.topology_devices(args.topology)
        except UserError as error:
            return cli.report_user_error(str(error))
        args.devices = len(chips)
        mesh = make_mesh(devices=chips)
    else:
        mesh = make_mesh(args.devices)
    if args.loss not in losses.registered():
        return cli.report_user_error(
            f"--loss {args.loss!r}: one of {', '.join(sorted(losses.registered()))}"
        )
    loss = losses.MarginLoss.create(args.loss)
    batch = padded_size(args.batch, args.devices)
    # The head training builds (head.ClassShardedHead) and, when it visits the classes in
    # blocks, the dense head it is timed against: the step below is its value_and_grad (with
    # --update, its update), the code the train step runs, on an identity backbone (the
    # embeddings are its parameters).
    memory = compile_bench.memory_budget(args.topology) if args.topology else None
    heads = {
        size: head.ClassShardedHead(
            loss,
            mesh,
            args.classes,
            args.dim,
            sample_rate=args.sample_rate,
            freeze_unsampled=args.freeze_unsampled,
            block_size=size,
            memory_bytes=memory,
        )
        for size in {args.block, 0}
    }
    margin_head = heads[args.block]
    block_size = margin_head.block_for(batch)
    padded, per_shard = margin_head.padded_classes, margin_head.classes_per_shard
    active = margin_head.budget(batch)
    sampled_rows = margin_head.sampled_rows

    # The recipe's optimizer, as build_components makes it: weight decay on the centres (not on
    # the embeddings standing in for the backbone), SGD with momentum.
    optim_config = recipes.base_config().optim
    tx = optim.make_optimizer(
        optim_config,
        optim_config.lr,
        lambda params: {
            "backbone": jax.tree.map(lambda _: False, params["backbone"]),
            "head": jax.tree.map(lambda _: True, params["head"]),
        },
    )

    def parameters(x, w):
        return {"backbone": {"embeddings": x}, "head": {"weight": w}}

    def objective(margin_head, y, key):
        state = margin_head.initial_state()

        def embeddings_then_head(params, rows):
            out = margin_head.loss(
                params["head"], state, params["backbone"]["embeddings"], y, key, rows
            )
            return out, None

        return embeddings_then_head

    def gradient_step(x, w, y, key, block=args.block):
        step = heads[block].value_and_grad(
            objective(heads[block], y, key), parameters(x, w), y, key
        )
        return step.output.loss, step.grads

    def update_step(params, opt_state, y, key, block=args.block):
        params, opt_state, step = heads[block].update(
            tx, objective(heads[block], y, key), params, opt_state, y, key
        )
        return params, opt_state, step.output.loss

    def centres(w):
        return {"backbone": {}, "head": {"weight": w}}

    def update_alone(params, opt_state):
        # The least the update costs: a zero gradient over the rows it moves.
        updates, opt_state = tx.update(jax.tree.map(jnp.zeros_like, params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def sampled_rows_update(params, opt_state, index):
        # The same, for the sampled rows where they lie, as the train step moves them.
        params_out, opt_state_out = update_alone(
            margin_head.take(params, index), margin_head.take(opt_state, index)
        )
        return (
            margin_head.keep(params_out, params, index, None),
            margin_head.keep(opt_state_out, opt_state, index, None),
        )

    rows = NamedSharding(mesh, P(DATA_AXIS))
    class_rows = NamedSharding(mesh, P(DATA_AXIS, None))
    replicated = NamedSharding(mesh, P())

    x_shape = jax.ShapeDtypeStruct((batch, args.dim), jnp.float32, sharding=rows)
    weight_shape = jax.ShapeDtypeStruct((padded, args.dim), jnp.float32, sharding=class_rows)
    batch_shapes = (
        jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows),
        jax.eval_shape(lambda: jax.random.key(0)),
    )
    if args.update:
        # The momentum of the centres and of the embeddings split by rows, as they are.
        opt_state_shape = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(
                leaf.shape, leaf.dtype, sharding=class_rows if leaf.ndim == 2 else replicated
            ),
            jax.eval_shape(tx.init, parameters(x_shape, weight_shape)),
        )
        shapes = (parameters(x_shape, weight_shape), opt_state_shape, *batch_shapes)
        step_fn, donate = update_step, (0, 1)
    else:
        shapes, step_fn, donate = (x_shape, weight_shape, *batch_shapes), gradient_step, ()
    try:
        compiled = jax.jit(step_fn, donate_argnums=donate).lower(*shapes).compile()
    except jax.errors.JaxRuntimeError as error:
        asked = compile_bench.exhausted_bytes(error)
        if args.topology is None or asked is None:
            raise
        # Too large for the chip: say so, with what XLA asked for, rather than a traceback.
        print(f"does not fit: {str(error).splitlines()[0]}")
        print(
            json.dumps(
                {
                    "loss": args.loss,
                    "batch": batch,
                    "classes": args.classes,
                    "dim": args.dim,
                    "devices": args.devices,
                    "block": block_size,
                    "topology": args.topology,
                    "fits": False,
                    "temp_bytes_asked": asked,
                }
            )
        )
        return 0
    # Class blocks: the dense head's step, timed in turn with the blocked one.
    twin = (
        jax.jit(functools.partial(step_fn, block=0), donate_argnums=donate).lower(*shapes).compile()
        if block_size and not args.abstract
        else None
    )
    result = {
        "loss": args.loss,
        "batch": batch,
        "classes": args.classes,
        "dim": args.dim,
        "devices": args.devices,
        "sample_rate": args.sample_rate,
        "freeze_unsampled": args.freeze_unsampled,
        "update": args.update,
        "block": block_size,
        "topology": args.topology,
        **({"fits": True} if args.topology else {}),
        "centres_per_device": active,
        "bytes_per_device": _memory(compiled),
        "temp_bytes_per_device": int(compiled.memory_analysis().temp_size_in_bytes),
        "weight_bytes_per_device": per_shard * args.dim * 4,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }
    if not args.abstract:
        keys = jax.random.split(jax.random.key(0), 2)
        x = jax.device_put(jax.random.normal(keys[0], (batch, args.dim)), rows)
        w = jax.device_put(0.01 * jax.random.normal(keys[1], (padded, args.dim)), class_rows)
        y = jax.device_put(jnp.arange(batch, dtype=jnp.int32) % args.classes, rows)
        if args.update:
            state = [parameters(x, w), jax.jit(tx.init)(parameters(x, w))]
            step_call = _carrying(compiled, state, y, jax.random.key(1))
            twin_call = twin and _carrying(
                twin,
                [parameters(jnp.copy(x), jnp.copy(w)), jax.jit(tx.init)(parameters(x, w))],
                y,
                jax.random.key(1),
            )
        else:
            step_call = functools.partial(compiled, x, w, y, jax.random.key(1))
            twin_call = twin and functools.partial(twin, x, w, y, jax.random.key(1))

        @jax.jit
        def floor_class_major(x, w, g):
            logits = w @ x.T  # [C_local, B], as the head computes them
            return logits, g.T @ w, g @ x  # + embedding and centre gradients

        @jax.jit
        def floor_batch_major(x, w, g):
            logits = x @ w.T  # [B, C_local]
            return logits, g @ w, g.T @ x

        # Every device holds all B embeddings and its own C_local rows, as in the head.
        sampled = args.devices * active
        xf = jax.device_put(jnp.ones((batch, args.dim)), replicated)
        wf = jax.device_put(jnp.ones((sampled, args.dim)), class_rows)
        calls = [
            step_call,
            functools.partial(
                floor_class_major, xf, wf, jax.device_put(jnp.ones((sampled, batch)), class_rows)
            ),
            functools.partial(
                floor_batch_major,
                xf,
                wf,
                jax.device_put(jnp.ones((batch, sampled)), NamedSharding(mesh, P(None, DATA_AXIS))),
            ),
        ]
        dense_write = not args.update and not sampled_rows and active < per_shard
        if dense_write:
            calls.append(jax.jit(lambda: jnp.zeros((padded, args.dim)), out_shardings=class_rows))
        if args.update:  # the rows the update moves: all of them, or the sampled ones
            moved = jax.device_put(
                jnp.ones((sampled if sampled_rows else padded, args.dim)), class_rows
            )
            calls.append(
                _carrying(
                    jax.jit(update_alone, donate_argnums=(0, 1)),
                    [centres(moved), jax.jit(tx.init)(centres(moved))],
                )
            )
        rows_update = args.update and sampled_rows
        if rows_update:  # the step's own rows, in the step's own state
            index = jax.jit(margin_head.sample)(y, jax.random.key(1))
            calls.append(
                _carrying(jax.jit(sampled_rows_update, donate_argnums=(0, 1)), state, index)
            )
        if twin:
            calls.insert(1, twin_call)
        step_ms, *floors_ms = _time_alternating(calls, args.repeats)
        dense_head_ms = floors_ms.pop(0) if twin else None
        rows_update_ms = floors_ms.pop() if rows_update else None
        if dense_write:
            write_ms = floors_ms.pop()
        update_ms = floors_ms.pop() if args.update else 0.0
        products_ms = min(floors_ms)
        floor_ms = products_ms + update_ms
        flops = 3 * 2 * batch * sampled * args.dim
        result.update(
            step_ms=round(step_ms, 2),
            floor_ms=round(floor_ms, 2),
            floor_class_major_ms=round(floors_ms[0], 2),
            floor_batch_major_ms=round(floors_ms[1], 2),
            ratio=round(step_ms / floor_ms, 3),
            floor_gflops_per_s=round(flops / products_ms / 1e6, 1),
        )
        if args.update:
            result.update(update_floor_ms=round(update_ms, 2))
            print(
                f"head step with the centres' update {step_ms:.1f} ms, floor "
                f"{floor_ms:.1f} ms (products {products_ms:.1f} + update {update_ms:.1f}), "
                f"ratio {step_ms / floor_ms:.2f}"
            )
            if rows_update_ms is not None:
                result.update(sampled_rows_update_ms=round(rows_update_ms, 2))
                print(
                    f"of which the update of the sampled rows where they lie (gather, "
                    f"update, scatter) alone: {rows_update_ms:.1f} ms, against "
                    f"{update_ms:.1f} ms for as many contiguous rows"
                )
        else:
            print(
                f"head step {step_ms:.1f} ms, floor {floor_ms:.1f} ms, "
                f"ratio {step_ms / floor_ms:.2f}"
            )
        if dense_write:
            result.update(
                dense_write_ms=round(write_ms, 2),
                ratio_with_dense_write=round(step_ms / (floor_ms + write_ms), 3),
            )
            print(
                f"writing the dense [C_local, d] gradient alone {write_ms:.1f} ms, ratio "
                f"with it {step_ms / (floor_ms + write_ms):.2f}"
            )
        if twin:
            result.update(
                dense_head_ms=round(dense_head_ms, 2),
                ratio_to_dense_head=round(step_ms / dense_head_ms, 3),
            )
            print(
                f"the dense head (--block 0) in the same run {dense_head_ms:.1f} ms: "
                f"blocked/dense {step_ms / dense_head_ms:.2f}"
            )
    if args.topology is not None:
        cost = compiled.cost_analysis()
        result["flops_per_device"] = float(cost["flops"]) if cost else None
    print(
        f"bytes per device {result['bytes_per_device'] / 2**20:.1f} MiB "
        f"(class centres {result['weight_bytes_per_device'] / 2**20:.1f} MiB, temporaries "
        f"{result['temp_bytes_per_device'] / 2**20:.1f} MiB)"
    )
    print(json.dumps(result))
    return 0
