"""Mesh, shardings and multi-host helpers.

magjax uses one mesh axis, ``data``: the batch is split over it for the backbone (plain
``jax.jit``; BatchNorm statistics per device or over the global batch, ``models.apply_train``),
and the classifier ``W [C, d]`` is split by class rows over the same axis for the margin head
(``jax.shard_map`` in :mod:`magjax.head`). This replaces pmap, which JAX now implements on top
of jit + shard_map.

The mesh is built with ``AxisType.Auto`` (classic GSPMD propagation): the backbone needs no
sharding annotations beyond its inputs, and optax/orbax create arrays inside jit without a
``jax.set_mesh`` context (jax-stack.md, pitfall 1).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None, devices: list | None = None) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` of ``devices`` (default: all of this
    platform's; ahead-of-time compilation passes the abstract devices of a TPU topology)."""
    devices = jax.devices() if devices is None else list(devices)
    count = len(devices) if num_devices is None else num_devices
    if count > len(devices):
        raise ValueError(f"asked for {count} devices, only {len(devices)} available")
    return jax.make_mesh(
        (count,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:count]
    )


def padded_size(size: int, multiple: int) -> int:
    """``size`` rounded up to a multiple of ``multiple``."""
    return math.ceil(size / multiple) * multiple


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``."""
    return NamedSharding(mesh, P(DATA_AXIS))


def path_name(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(tree: Any, mesh: Mesh, class_rows: Callable[[tuple, Any], bool]) -> Any:
    """Shardings for a train-state pytree: the leaves ``class_rows(path, leaf)`` selects (class
    centres and their optimizer moments, ``head.is_class_rows``) by rows over ``data``, every
    other leaf replicated."""

    def sharding(path, leaf):
        if class_rows(path, leaf):
            return NamedSharding(mesh, P(DATA_AXIS, None))
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(sharding, tree)


def global_batch(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles each host's slice of the batch into global arrays sharded on ``data``."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def to_host(tree: Any) -> Any:
    """Host numpy copies of the leaves of ``tree``, also when they span several processes.

    Replicated leaves are read from a local device; sharded ones are gathered from every
    process (a collective: every process must call this together).
    """
    from jax.experimental import multihost_utils

    def fetch(leaf):
        if not isinstance(leaf, jax.Array):
            return np.asarray(leaf)
        if leaf.is_fully_replicated:
            return np.asarray(leaf.addressable_data(0))
        if leaf.is_fully_addressable:
            return np.asarray(leaf)
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

    return jax.tree.map(fetch, tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def reduce_gradient_in(tree: Any, dtype: Any, axis: str = DATA_AXIS) -> Any:
    """Inside ``jax.shard_map``: ``tree`` (replicated over ``axis``) unchanged, as a per-device
    value; its gradient is each device's own, rounded to ``dtype`` and summed over ``axis`` in
    ``dtype``, then cast back.

    Written by hand because the transpose of ``shard_map`` sums a replicated input's gradient in
    that input's dtype (float32 parameters: a float32 all-reduce), and under plain jit XLA's
    partitioner places the reduction where it likes. ``bfloat16`` halves the all-reduced bytes;
    ``float16`` is DDP's ``fp16_compress_hook`` (each rank's share in float16, summed in
    float16). Compiled for TPU the all-reduce runs in ``dtype``; XLA:CPU widens it to float32
    (the per-device rounding stays).
    """
    return jax.tree.map(lambda leaf: jax.lax.pcast(leaf, axis, to="varying"), tree)


def _reduce_gradient_in_forward(tree, dtype, axis):
    return reduce_gradient_in(tree, dtype, axis), None


def _reduce_gradient_in_backward(dtype, axis, _, cotangent):
    return (jax.tree.map(lambda g: jax.lax.psum(g.astype(dtype), axis).astype(g.dtype), cotangent),)


reduce_gradient_in.defvjp(_reduce_gradient_in_forward, _reduce_gradient_in_backward)
