"""The class-sharded margin head, with optional Partial FC negative sampling.

The classifier ``W [C_pad, d]`` is split by rows over the mesh axis ``data``: device ``k`` owns
classes ``[k·C_local, (k+1)·C_local)`` with ``C_local = ceil(C/N)``; rows from ``C`` on are
padding, masked out of the softmax (``C`` need not divide the device count). Inside
``jax.shard_map`` each device

1. all-gathers the embeddings, labels and row mask of the global batch (the transpose of this
   gather reduce-scatters the embedding gradients back to their devices),
2. computes the cosines against its own class rows only (class-major ``[C_local, B]``: no
   device ever holds the cosines of all ``C`` classes), applies the margin where it owns the
   label,
3. joins the softmax over shards with ``pmax``/``psum``
   (:func:`magjax.losses.margin_cross_entropy`).

This is hand-written because no library shards a margin softmax by class. The loss math itself
is :mod:`magjax.losses`; this module only lays it out over devices.

Partial FC (An et al., 2021; arcface_torch ``PartialFC_V2``), ``sample_rate r < 1``: each shard
keeps per step every class centre that is a positive of the global batch plus uniformly sampled
negatives, ``K`` centres in all (static under jit). ``K = max(int(r·C_local), min(B, C_local))``
with ``B`` the global batch: the budget always has room for every positive the shard can hold.
arcface_torch uses ``int(r·C_local)`` and, when positives exceed it, only the positives; the two
agree whenever ``int(r·C_local) ≥ min(B, C_local)``, the regime of every real configuration.
Sampling draws a uniform score per class, forces positives to 2 and takes the top ``K`` (as the
official code), with the key folded with the shard index. Unsampled rows get exactly zero
gradient; whether momentum and weight decay still move them is the optimizer's choice
(arcface_torch keeps them in one SGD, so they do). When they must not move
(``head.freeze_unsampled``), training samples first and differentiates the sampled rows alone
(:func:`partial_fc_sampler`, :func:`take_rows`, :func:`sampled_rows_loss`, :func:`put_rows`).

:class:`ClassShardedHead` puts these pieces together: its parameters and state, its loss and,
given the optimizer, one update of the rows it used. The train step and ``python -m
magjax.bench head`` both go through it, so that the benchmark times the code training runs
and a new Partial FC variant is written here alone.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from magjax import losses, optim
from magjax.parallel import DATA_AXIS, padded_size, path_name


def class_rows_per_shard(mesh: Mesh, num_classes: int) -> int:
    """``C_local = ceil(C/N)``: the class rows (padding included) each device of ``data`` owns."""
    devices = mesh.shape[DATA_AXIS]
    return padded_size(num_classes, devices) // devices


def partial_fc_budget(sample_rate: float, classes_per_shard: int, global_batch: int) -> int:
    """Centres kept per shard and step (see the module docstring)."""
    if sample_rate >= 1.0:
        return classes_per_shard
    return max(int(sample_rate * classes_per_shard), min(global_batch, classes_per_shard))


# head.block_size unset: the dense head while its two [C_local, B] arrays (the exponentials kept
# for the backward pass and the logits' gradient) take at most this share of a device's memory,
# which leaves the other half to the centres, their optimizer state and the backbone (at r = 1.0
# on v5p-64 the dense head still fit with them at 80%: BENCHMARKS.md, "Capacity"). Past it, class
# blocks whose one [block, B] array takes at most BLOCK_SHARE of the memory, a power of two in
# BLOCK_ROWS: no smaller (the loop's per-block work), no larger (what one more doubling saves).
DENSE_SHARE = 0.5
BLOCK_SHARE = 1 / 64
BLOCK_ROWS = (256, 8192)


def class_block_size(
    block_size: int | None, classes: int, batch: int, itemsize: int, memory_bytes: int | None
) -> int | None:
    """The classes a shard visits at a time (:mod:`magjax.losses.blocked`), None for the dense
    head, for ``classes`` rows against a global ``batch`` of ``itemsize``-byte cosines.

    ``block_size`` (``head.block_size``): 0, the dense head; ``N >= 1``, ``N``; None, the memory
    rule: the dense head (the fastest: blocks cost one more logits product, BENCHMARKS.md) when
    its ``2 · classes · batch`` values take at most :data:`DENSE_SHARE` of ``memory_bytes`` (a
    device's memory; unknown: dense), else the largest power of two in :data:`BLOCK_ROWS`
    whose ``[block, batch]`` values take at most :data:`BLOCK_SHARE` of it.
    """
    if block_size is not None:
        return block_size or None
    if memory_bytes is None or 2 * classes * batch * itemsize <= DENSE_SHARE * memory_bytes:
        return None
    block = BLOCK_ROWS[0]
    while 2 * block <= BLOCK_ROWS[1] and 2 * block * batch * itemsize <= BLOCK_SHARE * memory_bytes:
        block *= 2
    return min(block, classes)


def device_memory_bytes(mesh: Mesh) -> int | None:
    """The memory of one device of ``mesh``: an accelerator's allocator limit; for CPU devices
    the host's physical memory over the process's CPU devices (they share it); None where a
    device cannot say (a topology's chips compiled for on another host, where ``bench
    compile`` passes the chip's HBM instead)."""
    device = mesh.devices.flat[0]
    try:
        stats = device.memory_stats()
    except jax.errors.JaxRuntimeError:  # not addressable: a compile-only topology
        return None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return host // jax.local_device_count("cpu")
    return None


class HeadOutput(NamedTuple):
    """What :func:`sharded_margin_loss` returns."""

    loss: jax.Array  # scalar: cross entropy plus the loss's penalty
    metrics: dict  # replicated scalars: ``loss_ce`` and the loss's own
    state: dict  # the loss state after this batch
    sampled: jax.Array  # [C_pad] bool: the class rows used this step (all without Partial FC)
    logits: jax.Array | None = None  # [B, C_pad] with ``return_logits`` (0 where unsampled)


# A shard's rows of the batch, joined into the global batch on every shard.
_all_gather = functools.partial(lax.all_gather, axis_name=DATA_AXIS, tiled=True, to="invarying")


def _gather_batch(embeddings, labels, row_mask):
    """The global batch on every shard; the embeddings widened once to the head dtype
    (magjax's backbones already emit float32 embeddings, as arcface_torch under autocast; a
    caller may pass bfloat16 ones): the cosine and norm paths then add their embedding
    gradients in float32 and round once."""
    x, labels, row_mask = _all_gather(embeddings), _all_gather(labels), _all_gather(row_mask)
    return x.astype(losses.head_dtype(x.dtype)), labels, row_mask


def _local_labels(labels, row_mask, classes_per_shard):
    """This shard's first class, each sample's label relative to it, and whether it is here."""
    start = lax.axis_index(DATA_AXIS) * classes_per_shard
    local_label = labels - start
    owned = (local_label >= 0) & (local_label < classes_per_shard) & row_mask
    return start, local_label, owned


def _sample(local_label, owned, key, start, classes_per_shard, num_classes, budget):
    """Partial FC's rows of this shard, sorted: every positive, then the top of uniform scores
    (the key folded with the shard index)."""
    class_ids = start + jnp.arange(classes_per_shard)
    scores = jax.random.uniform(
        jax.random.fold_in(key, lax.axis_index(DATA_AXIS)), (classes_per_shard,)
    )
    positive = (
        jnp.zeros(classes_per_shard, bool)
        .at[jnp.where(owned, local_label, classes_per_shard)]
        .set(True, mode="drop")
    )
    scores = jnp.where(positive, 2.0, jnp.where(class_ids < num_classes, scores, -1.0))
    return top_indices(scores, budget)


def top_indices(scores: jax.Array, k: int) -> jax.Array:
    """Indices of the ``k`` largest of ``scores [n]`` (float32 or, under x64, float64),
    ascending: the set ``lax.top_k`` returns, ties going to the lower index as there.

    Written by hand because XLA:CPU's TopK plus the sort of its indices take 6-7 ms for
    Partial FC's 100k scores per shard, a tenth of the head's step. This finds the ``k``-th
    largest score digit by digit over its bits (two bits per pass: three counts of
    ``scores >= t``), keeps every score above it and the lowest-index ties, and reads the
    indices off a running count, already in order: ~3 ms.
    """
    width = jnp.dtype(scores.dtype).itemsize * 8
    signed, unsigned = jnp.dtype(f"int{width}"), jnp.dtype(f"uint{width}")
    bits = lax.bitcast_convert_type(scores, signed)
    # float -> unsigned int preserving order: negatives (sign bit set) get every bit flipped,
    # the others only the sign bit.
    sign = jnp.array(-(2 ** (width - 1)), signed)
    order = lax.bitcast_convert_type(jnp.where(bits < 0, ~bits, bits ^ sign), unsigned)
    digits = jnp.arange(1, 4, dtype=unsigned)  # the nonzero values of two bits

    def next_digit(step, kth):  # kth grows to the largest t with count(order >= t) >= k
        candidates = kth | (digits << (width - 2 - 2 * step).astype(unsigned))
        counts = jnp.sum(order[None, :] >= candidates[:, None], axis=1)
        return jnp.max(jnp.where(counts >= k, candidates, kth))

    # A loop, not unrolled passes: as fast here, and compiles in a third of the time (two bits
    # per pass: 1.3 ms less than one, four: 2.3 ms more).
    kth = lax.fori_loop(0, width // 2, next_digit, jnp.zeros_like(order[0]))
    above, tied = order > kth, order == kth
    ties_needed = k - jnp.sum(above)
    # Random scores rarely tie at the k-th: then every tie is taken, without the running count.
    chosen = lax.cond(
        jnp.sum(tied) == ties_needed,
        lambda: above | tied,
        lambda: above | (tied & (jnp.cumsum(tied) <= ties_needed)),
    )
    # The j-th chosen index is the first position where the running count reaches j.
    return jnp.searchsorted(jnp.cumsum(chosen), jnp.arange(1, k + 1)).astype(jnp.int32)


def _loss_on_rows(
    loss,
    x,
    rows,
    class_ids,
    local_label,
    owned,
    row_mask,
    state,
    num_classes,
    block_size,
    memory_bytes,
    return_logits=False,
):
    """The margin loss of the global batch against this shard's ``rows`` (classes
    ``class_ids``; ``local_label`` indexes ``rows`` where ``owned``), dense or a block of
    classes at a time (:mod:`magjax.losses.blocked`), as :func:`class_block_size` picks from
    ``block_size`` and ``memory_bytes``."""
    block = class_block_size(block_size, rows.shape[0], x.shape[0], x.dtype.itemsize, memory_bytes)
    local_label = jnp.where(owned, local_label, -1)
    if block:
        # The same casts and sums as the dense path below; the cosines are formed block by
        # block inside the loss, the target ones gathered here.
        x_unit, target_cos = losses.blocked.target_cosines(
            lax.pcast(x, DATA_AXIS, to="varying"), rows, local_label
        )
        target_cos = lax.psum(target_cos, DATA_AXIS)
        total, metrics, new_state = losses.blocked.blocked_margin_loss(
            x_unit,
            rows.astype(x_unit.dtype),
            target_cos,
            local_label,
            losses.safe_norm(x),
            loss,
            state,
            block=block,
            row_mask=row_mask,
            class_mask=class_ids < num_classes,
            axis_name=DATA_AXIS,
            return_logits=return_logits,
        )
        return total, metrics, new_state, metrics.pop("logits", None)
    # Cast to varying: this shard's cosine gradient w.r.t. x is a per-shard term, summed over
    # shards by the cast's transpose (cosine_similarity's hand-written VJP cannot psum).
    cos, target_cos = losses.cosine_similarity(
        lax.pcast(x, DATA_AXIS, to="varying"), rows, local_label
    )
    # Each target cosine from the shard that owns it (0 elsewhere), so that every shard
    # computes the loss's margin, statistics and state from the whole batch.
    target_cos = lax.psum(target_cos, DATA_AXIS)
    total, metrics, new_state = losses.margin_loss(
        cos,
        target_cos,
        local_label,
        losses.safe_norm(x),
        loss,
        state,
        row_mask=row_mask,
        class_mask=class_ids < num_classes,
        axis_name=DATA_AXIS,
    )
    logits = metrics.pop("logits")
    return total, metrics, new_state, logits


# The loss's metrics and state are replicated scalars whatever their names (P() covers the
# whole dict); the per-class outputs are split like the classes.
_OUT_SPECS = (P(), P(), P(), P(DATA_AXIS))


def sharded_margin_loss(
    loss: losses.MarginLoss,
    mesh: Mesh,
    num_classes: int,
    *,
    sample_rate: float = 1.0,
    return_logits: bool = False,
    block_size: int | None = None,
    memory_bytes: int | None = None,
):
    """Builds ``fn(embeddings, weight, labels, row_mask, state, key) -> HeadOutput``.

    ``block_size`` (``head.block_size``): 0 computes each shard's ``[C_local, B]`` cosines at
    once; ``n >= 1`` visits the shard's classes (with Partial FC, its sampled rows) ``n`` at a
    time, so that no ``[C_local, B]`` array exists (:mod:`magjax.losses.blocked`; the same loss
    and gradients); None picks one of the two from a device's ``memory_bytes``
    (:func:`class_block_size`).

    ``embeddings [B, d]``, ``labels [B]`` and ``row_mask [B]`` are split over ``data`` (``B``
    divisible by the device count; pad with masked rows); ``weight [C_pad, d]`` by rows. With
    Partial FC the gradient w.r.t. ``weight`` is dense (zero on unsampled rows); a training
    step that only moves the sampled rows uses :func:`partial_fc_sampler` and
    :func:`sampled_rows_loss` instead, with a gradient of the sampled rows alone.
    """
    classes_per_shard = class_rows_per_shard(mesh, num_classes)

    def local(embeddings, weight, labels, row_mask, state, key):
        x, labels, row_mask = _gather_batch(embeddings, labels, row_mask)
        start, local_label, owned = _local_labels(labels, row_mask, classes_per_shard)
        class_ids = start + jnp.arange(classes_per_shard)
        budget = partial_fc_budget(sample_rate, classes_per_shard, x.shape[0])
        if budget < classes_per_shard:
            index = _sample(local_label, owned, key, start, classes_per_shard, num_classes, budget)
            local_label = jnp.searchsorted(index, local_label)
            weight = weight[index]
            class_ids = class_ids[index]
            sampled = jnp.zeros(classes_per_shard, bool).at[index].set(True)
        else:
            index = None
            sampled = jnp.ones(classes_per_shard, bool)
        total, metrics, new_state, logits = _loss_on_rows(
            loss,
            x,
            weight,
            class_ids,
            local_label,
            owned,
            row_mask,
            state,
            num_classes,
            block_size,
            memory_bytes,
            return_logits,
        )
        outputs = (total, metrics, new_state, sampled)
        if return_logits:
            logits = logits.T  # [B, C_local], as the reference files lay them out
            if index is not None:
                logits = (
                    jnp.zeros((x.shape[0], classes_per_shard), logits.dtype)
                    .at[:, index]
                    .set(logits)
                )
            outputs += (logits,)
        return outputs

    out_specs = _OUT_SPECS + ((P(None, DATA_AXIS),) if return_logits else ())
    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(DATA_AXIS), P(DATA_AXIS, None), P(DATA_AXIS), P(DATA_AXIS), P(), P()),
        out_specs=out_specs,
    )
    return lambda *args: HeadOutput(*sharded(*args))


def partial_fc_sampler(mesh: Mesh, num_classes: int, sample_rate: float):
    """Builds ``fn(labels, row_mask, key) -> index``: Partial FC's rows, ``[D·K]`` split over
    ``data`` (each shard's ``K`` sampled rows of its own ``C_pad/D``, sorted), the rows
    :func:`sharded_margin_loss` samples for the same key."""
    classes_per_shard = class_rows_per_shard(mesh, num_classes)

    def local(labels, row_mask, key):
        labels, row_mask = _all_gather(labels), _all_gather(row_mask)
        start, local_label, owned = _local_labels(labels, row_mask, classes_per_shard)
        budget = partial_fc_budget(sample_rate, classes_per_shard, labels.shape[0])
        return _sample(local_label, owned, key, start, classes_per_shard, num_classes, budget)

    return jax.shard_map(
        local, mesh=mesh, in_specs=(P(DATA_AXIS), P(DATA_AXIS), P()), out_specs=P(DATA_AXIS)
    )


def take_rows(mesh: Mesh):
    """``fn(array [C_pad, ...], index) -> array[index]`` shard by shard (``index`` as
    :func:`partial_fc_sampler` returns it): each shard's sampled rows, ``[D·K, ...]``."""
    return jax.shard_map(
        lambda array, index: array[index],
        mesh=mesh,
        in_specs=(P(DATA_AXIS), P(DATA_AXIS)),
        out_specs=P(DATA_AXIS),
    )


def put_rows(mesh: Mesh):
    """``fn(array, index, rows) -> array`` with each shard's sampled rows replaced by
    ``rows`` (the inverse of :func:`take_rows`; the other rows unchanged)."""
    return jax.shard_map(
        lambda array, index, rows: array.at[index].set(rows),
        mesh=mesh,
        in_specs=(P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS)),
        out_specs=P(DATA_AXIS),
    )


def sampled_rows_loss(
    loss: losses.MarginLoss,
    mesh: Mesh,
    num_classes: int,
    block_size: int | None = None,
    memory_bytes: int | None = None,
):
    """Builds ``fn(embeddings, rows, index, labels, row_mask, state) -> HeadOutput``: the
    margin loss against the sampled rows alone (``rows = take_rows(weight, index)``), so that
    its gradient is ``[D·K, d]``, not a dense ``[C_pad, d]`` of mostly zeros. The same loss and
    gradients as :func:`sharded_margin_loss` for the rows it samples (``block_size`` and
    ``memory_bytes`` as there)."""
    classes_per_shard = class_rows_per_shard(mesh, num_classes)

    def local(embeddings, rows, index, labels, row_mask, state):
        x, labels, row_mask = _gather_batch(embeddings, labels, row_mask)
        start, local_label, owned = _local_labels(labels, row_mask, classes_per_shard)
        local_label = jnp.searchsorted(index, local_label)
        total, metrics, new_state, _ = _loss_on_rows(
            loss,
            x,
            rows,
            start + index,
            local_label,
            owned,
            row_mask,
            state,
            num_classes,
            block_size,
            memory_bytes,
        )
        sampled = jnp.zeros(classes_per_shard, bool).at[index].set(True)
        return total, metrics, new_state, sampled

    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(DATA_AXIS), P(DATA_AXIS, None), P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS), P()),
        out_specs=_OUT_SPECS,
    )
    return lambda *args: HeadOutput(*sharded(*args))


def init_weight(kind: str, num_classes: int):
    """Class-centre initialiser; rows from ``num_classes`` on (padding) are zero.

    ``"normal"``: N(0, 0.01²) as arcface_torch's PartialFC_V2. ``"unit"``: random unit rows,
    as MagFace's and AdaFace's uniform/renorm initialisation ends up (each centre of norm 1).
    """

    def init(key, shape, dtype=jnp.float32):
        if kind == "normal":
            w = 0.01 * jax.random.normal(key, shape, dtype)
        elif kind == "unit":
            w = losses.l2_normalize(jax.random.uniform(key, shape, dtype, -1.0, 1.0))
        else:
            raise ValueError(f"unknown head init {kind!r}; expected 'normal' or 'unit'")
        return jnp.where(jnp.arange(shape[0])[:, None] < num_classes, w, 0.0)

    return init


# The class centres in a train state: the head's ``weight`` under the name ``head`` (and the
# optimizer moments that share that path suffix). Their rows are the classes: split over
# ``data`` (parallel.state_shardings) and, under Partial FC with freeze_unsampled, kept per row
# (optim.keep_unsampled_rows).
_CLASS_ROWS = re.compile(r"(^|/)head/weight$")


def is_class_rows(path: tuple, leaf: Any) -> bool:
    """Whether the train-state leaf at ``path`` holds class centres by rows."""
    return bool(_CLASS_ROWS.search(path_name(path))) and getattr(leaf, "ndim", 0) == 2


def on_class_rows(mesh: Mesh):
    """Builds ``on_rows(tree, index, update=None)`` for Partial FC's sampled-rows update: the
    class-row leaves of the train-state ``tree`` (:func:`is_class_rows`: the centres and their
    optimizer moments) cut to the rows ``index`` (:func:`take_rows`), or, given ``update`` (a
    tree of the same structure holding such cut leaves), ``tree`` with those rows replaced by
    them (:func:`put_rows`). The other leaves pass through, from ``update`` when given."""
    take, put = take_rows(mesh), put_rows(mesh)

    def on_rows(tree, index, update=None):
        def leaf(path, value, *new):
            if not is_class_rows(path, value):
                return new[0] if new else value
            return put(value, index, new[0]) if new else take(value, index)

        args = (tree,) if update is None else (tree, update)
        return jax.tree_util.tree_map_with_path(leaf, *args)

    return on_rows


# The key the centres are drawn from: ``key`` folded as Flax folds the first ``params`` key of a
# top-level module (SHA-1 of the counter 1), as when the head was a Flax module: a seed still
# gives the centres it always gave (the demo's params_sha256 unchanged).
_WEIGHT_KEY_DATA = int.from_bytes(hashlib.sha1(b"\x01").digest()[:4], "big")


class HeadGradient(NamedTuple):
    """What :meth:`ClassShardedHead.value_and_grad` returns."""

    rows: jax.Array | None  # Partial FC's rows differentiated alone (``sample``), or None
    params: Any  # the parameters differentiated: the class rows cut to ``rows``
    output: HeadOutput  # the head's loss, metrics, new state and rows used
    aux: Any  # what the objective returned besides
    grads: Any  # the gradient, structured as ``params``


@dataclasses.dataclass
class ClassShardedHead:
    """The class-sharded margin head over ``mesh``, Partial FC included: the one way the train
    step (``make_train_step``) and ``python -m magjax.bench head`` reach the head.

    Its parameters are ``{"weight": W [C_pad, d]}`` (the train state's ``params["head"]``,
    rows split over ``data``), its state the loss's (the train state's ``margin_state``:
    AdaFace's and CurricularFace's EMAs): :meth:`init`. A training step is :meth:`update`:

    1. :meth:`sample`: with :attr:`sampled_rows`, Partial FC's rows, chosen before the gradient;
    2. :meth:`take`: the class-row leaves (:func:`is_class_rows`) of the parameters and of the
       optimizer state cut to those rows;
    3. :meth:`value_and_grad`: the caller's objective (its forward, then :meth:`loss`)
       differentiated w.r.t. those parameters;
    4. the optimizer's update, then :meth:`keep`: the updated rows put back where they lie, or,
       with ``freeze_unsampled`` and a dense gradient, the unsampled rows restored.

    ``freeze_unsampled`` (``head.freeze_unsampled``, with ``sample_rate < 1``): unsampled
    centres and their optimizer state do not move. ``rows_gradient`` picks how: True
    differentiates the sampled rows alone (no dense ``[C_pad, d]`` gradient); False takes the
    dense gradient and restores the unsampled rows after the update (the same result). Under
    gradient accumulation each micro-batch samples other rows, so ``freeze_unsampled`` with
    ``optim.accumulate_steps > 1`` is refused by ``magjax.config_check``.
    ``block_size`` (``head.block_size``): see :func:`sharded_margin_loss`; unset, the rule of
    :func:`class_block_size` against ``memory_bytes``, a device's memory (by default
    :func:`device_memory_bytes`), which :meth:`block_for` tells.
    """

    margin_loss: losses.MarginLoss
    mesh: Mesh
    num_classes: int
    embedding_dim: int
    sample_rate: float = 1.0
    freeze_unsampled: bool = False
    rows_gradient: bool = True
    weight_init: str = "normal"
    block_size: int | None = None
    memory_bytes: int | None = None
    classes_per_shard: int = dataclasses.field(init=False)
    # The shard_map'ed pieces, built once per head (for its settings).
    _dense_loss: Callable = dataclasses.field(init=False, repr=False, compare=False)
    _rows_loss: Callable | None = dataclasses.field(init=False, repr=False, compare=False)
    _sampler: Callable | None = dataclasses.field(init=False, repr=False, compare=False)
    _on_rows: Callable | None = dataclasses.field(init=False, repr=False, compare=False)

    @classmethod
    def from_config(
        cls,
        config,
        mesh: Mesh,
        loss: losses.MarginLoss,
        num_classes: int,
        memory_bytes: int | None = None,
    ) -> ClassShardedHead:
        """The head a training config describes (``head.*``, ``model.embedding_dim``; the
        sampled rows' own gradient unless ``optim.accumulate_steps > 1``); ``memory_bytes`` a
        device's memory where :func:`device_memory_bytes` cannot read it."""
        return cls(
            loss,
            mesh,
            num_classes,
            config.model.embedding_dim,
            sample_rate=config.head.sample_rate,
            freeze_unsampled=config.head.freeze_unsampled,
            rows_gradient=config.optim.accumulate_steps == 1,
            weight_init=config.head.weight_init,
            block_size=config.head.block_size,
            memory_bytes=memory_bytes,
        )

    def __post_init__(self):
        self.classes_per_shard = class_rows_per_shard(self.mesh, self.num_classes)
        if self.memory_bytes is None:
            self.memory_bytes = device_memory_bytes(self.mesh)
        self._dense_loss = sharded_margin_loss(
            self.margin_loss,
            self.mesh,
            self.num_classes,
            sample_rate=self.sample_rate,
            block_size=self.block_size,
            memory_bytes=self.memory_bytes,
        )
        self._rows_loss = self._sampler = self._on_rows = None
        if self.sampled_rows:
            self._sampler = partial_fc_sampler(self.mesh, self.num_classes, self.sample_rate)
            self._rows_loss = sampled_rows_loss(
                self.margin_loss, self.mesh, self.num_classes, self.block_size, self.memory_bytes
            )
            self._on_rows = on_class_rows(self.mesh)

    @property
    def padded_classes(self) -> int:
        """``C_pad``: the rows of ``W``."""
        return self.classes_per_shard * self.mesh.shape[DATA_AXIS]

    @property
    def frozen(self) -> bool:
        """Whether unsampled centres and their optimizer state must stay as they are."""
        return self.freeze_unsampled and self.sample_rate < 1.0

    @property
    def sampled_rows(self) -> bool:
        """Whether a step differentiates Partial FC's sampled rows alone."""
        return self.frozen and self.rows_gradient

    def budget(self, global_batch: int) -> int:
        """Centres each shard uses per step (:func:`partial_fc_budget`)."""
        return partial_fc_budget(self.sample_rate, self.classes_per_shard, global_batch)

    def block_for(self, global_batch: int) -> int | None:
        """The classes a shard visits at a time for ``global_batch`` float32 embeddings (None:
        the dense head), as the loss picks them (:func:`class_block_size`)."""
        return class_block_size(
            self.block_size, self.budget(global_batch), global_batch, 4, self.memory_bytes
        )

    def describe(self, global_batch: int) -> str:
        """One line for the training log: how a shard forms its logits for ``global_batch``."""
        classes = self.budget(global_batch)
        dense_mib = 2 * classes * global_batch * 4 / 2**20
        memory = (
            ""
            if self.memory_bytes is None
            else f" of a device's {self.memory_bytes / 2**30:.1f} GiB"
        )
        block = self.block_for(global_batch)
        if block is None:
            return (
                f"margin head: dense, {classes:,} classes per shard x {global_batch} samples "
                f"({dense_mib:,.0f} MiB of logits and their gradient{memory})"
            )
        return (
            f"margin head: {block:,} classes at a time of {classes:,} per shard (head.block_size; "
            f"dense, the logits and their gradient would take {dense_mib:,.0f} MiB{memory})"
        )

    def initial_state(self) -> dict:
        """The loss's state before the first step, float32 as the train state holds it."""
        return {
            name: jnp.asarray(value, jnp.float32)
            for name, value in self.margin_loss.initial_state().items()
        }

    def init(self, key: jax.Array) -> tuple[dict, dict]:
        """``(params, state)``: the centres (``head.weight_init``; padding rows zero) and the
        loss's initial state."""
        weight = init_weight(self.weight_init, self.num_classes)(
            jax.random.fold_in(key, _WEIGHT_KEY_DATA), (self.padded_classes, self.embedding_dim)
        )
        return {"weight": weight}, self.initial_state()

    def sample(self, labels: jax.Array, key: jax.Array) -> jax.Array | None:
        """With :attr:`sampled_rows`, the rows a step uses (:func:`partial_fc_sampler`, the
        rows :meth:`loss` would sample for ``key``); otherwise None: every row takes part in
        the gradient (the loss samples inside, if at all)."""
        if not self.sampled_rows:
            return None
        return self._sampler(labels, jnp.ones(labels.shape, bool), key)

    def take(self, tree: Any, rows: jax.Array | None) -> Any:
        """``tree`` (parameters or optimizer state) with its class-row leaves cut to ``rows``
        (:func:`on_class_rows`); unchanged for None."""
        return tree if rows is None else self._on_rows(tree, rows)

    def keep(self, new: Any, old: Any, rows: jax.Array | None, sampled: jax.Array) -> Any:
        """After an update of :meth:`take`'s ``new`` tree: ``old`` with the updated ``rows``
        put back; with a dense gradient and ``freeze_unsampled``, ``new`` with the rows not
        ``sampled`` restored from ``old`` (:func:`magjax.optim.keep_unsampled_rows`)."""
        if rows is not None:
            return self._on_rows(old, rows, new)
        if self.frozen:
            return optim.keep_unsampled_rows(new, old, sampled, is_class_rows)
        return new

    def loss(
        self,
        params: dict,
        state: dict,
        embeddings: jax.Array,
        labels: jax.Array,
        key: jax.Array,
        rows: jax.Array | None = None,
        row_mask: jax.Array | None = None,
    ) -> HeadOutput:
        """The margin loss of the batch (``embeddings [B, d]``, ``labels [B]`` split over
        ``data``; ``row_mask`` marks real samples, all by default) against ``params["weight"]``:
        all centres (Partial FC sampling inside, for ``key``) or, given ``rows``, the rows
        :meth:`take` cut (:func:`sampled_rows_loss`). The new state keeps ``state``'s dtypes."""
        if row_mask is None:
            row_mask = jnp.ones(labels.shape, bool)
        if rows is None:
            out = self._dense_loss(embeddings, params["weight"], labels, row_mask, state, key)
        else:
            out = self._rows_loss(embeddings, params["weight"], rows, labels, row_mask, state)
        return out._replace(
            state={name: value.astype(state[name].dtype) for name, value in out.state.items()}
        )

    def value_and_grad(
        self, objective: Callable, params: Any, labels: jax.Array, key: jax.Array
    ) -> HeadGradient:
        """Steps 1-3 of :meth:`update`: ``objective(params, rows) -> (HeadOutput, aux)``
        (whose ``params["head"]`` goes to :meth:`loss` with ``rows``) differentiated w.r.t.
        ``params`` with the class rows cut to the sampled ones."""
        rows = self.sample(labels, key)
        params = self.take(params, rows)

        def total(params):
            output, aux = objective(params, rows)
            return output.loss, (output, aux)

        (_, (output, aux)), grads = jax.value_and_grad(total, has_aux=True)(params)
        return HeadGradient(rows, params, output, aux, grads)

    def update(
        self,
        tx: optax.GradientTransformation,
        objective: Callable,
        params: Any,
        opt_state: Any,
        labels: jax.Array,
        key: jax.Array,
    ) -> tuple[Any, Any, HeadGradient]:
        """One step of ``tx`` on ``params`` (``{"head": ..., ...}``) through ``objective``
        (:meth:`value_and_grad`), the class rows moved as Partial FC and ``freeze_unsampled``
        require: ``(params, opt_state, gradient)``."""
        step = self.value_and_grad(objective, params, labels, key)
        updates, new_opt_state = tx.update(step.grads, self.take(opt_state, step.rows), step.params)
        new_params = optax.apply_updates(step.params, updates)
        sampled = step.output.sampled
        return (
            self.keep(new_params, params, step.rows, sampled),
            self.keep(new_opt_state, opt_state, step.rows, sampled),
            step,
        )
