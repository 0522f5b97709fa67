"""Runs magjax's losses on the cases of a ``magjax-loss-refs/1`` file (``python -m
magjax.refcheck``): the dense loss and its gradients (:func:`value_and_grads`) or the
class-sharded head on N devices (:func:`reference_step`), in the reference files' field names.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from magjax import head, losses
from magjax.parallel import make_mesh, padded_size
from magjax.refcheck import field_error, within_tolerance


def loss_from_case(case: dict):
    """The :class:`magjax.losses.MarginLoss` that reproduces the official code of ``case``."""
    return losses.MarginLoss.create(case["loss"], **case["hparams"])


def value_and_grads(
    embeddings: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    loss: losses.MarginLoss,
    state: dict | None = None,
) -> dict[str, Any]:
    """:func:`magjax.losses.dense_loss` and its gradients, in the field names of the reference
    files.

    Returns ``logits`` (``[B, C]``), ``loss``, ``loss_ce``, ``loss_g`` (MagFace),
    ``grad_embeddings``, ``grad_weight`` and ``state_after``.
    """

    def total(embeddings, weight):
        value, metrics, new_state = losses.dense_loss(embeddings, weight, labels, loss, state)
        return value, (metrics, new_state)

    (value, (metrics, new_state)), (grad_x, grad_w) = jax.value_and_grad(
        total, argnums=(0, 1), has_aux=True
    )(embeddings, weight)
    return {
        **metrics,
        "logits": metrics["logits"].T,
        "loss": value,
        "grad_embeddings": grad_x,
        "grad_weight": grad_w,
        "state_after": new_state,
    }


def reference_step(
    loss: losses.MarginLoss, devices: int, sample_rate: float = 1.0, block_size: int | None = None
):
    """A jitted ``fn(embeddings, weight, labels, state) -> dict`` that runs the sharded head on
    ``devices`` devices (``block_size`` classes at a time if given) and returns the fields of
    the reference files (as :func:`value_and_grads`). Batch and classes are padded here, so any
    shapes work; the padding is checked to contribute nothing by slicing it off.
    """
    mesh = make_mesh(devices)

    def step(embeddings, weight, labels, state):
        batch, classes = embeddings.shape[0], weight.shape[0]
        rows = padded_size(batch, devices)
        x = jnp.pad(embeddings, ((0, rows - batch), (0, 0)))
        y = jnp.pad(labels, (0, rows - batch))
        mask = jnp.arange(rows) < batch
        w = jnp.pad(weight, ((0, padded_size(classes, devices) - classes), (0, 0)))
        fn = head.sharded_margin_loss(
            loss, mesh, classes, sample_rate=sample_rate, return_logits=True, block_size=block_size
        )

        def total(x, w):
            out = fn(x, w, y, mask, state, jax.random.key(0))
            return out.loss, (out.metrics, out.state, out.logits)

        (value, (metrics, new_state, logits)), (gx, gw) = jax.value_and_grad(
            total, argnums=(0, 1), has_aux=True
        )(x, w)
        return {
            **metrics,
            "logits": logits[:batch, :classes],
            "loss": value,
            "grad_embeddings": gx[:batch],
            "grad_weight": gw[:classes],
            "state_after": new_state,
        }

    return jax.jit(step)


def run_case(
    case: dict, dtype: str, mesh_devices: int, block_size: int | None = None
) -> dict[str, list]:
    """Runs every step of a loss case; returns ``{field: [got, expected]}`` per step, flattened.
    With ``block_size`` the head visits the classes that many at a time (through the sharded
    head on ``mesh_devices`` devices, or on one)."""
    loss = loss_from_case(case)
    weight = jnp.asarray(np.asarray(case["weight"]), dtype=dtype)
    state = case.get("initial_state") or loss.initial_state()
    state = {k: jnp.asarray(v, dtype=dtype) for k, v in state.items()}
    if mesh_devices or block_size:
        step_fn = reference_step(loss, mesh_devices or 1, block_size=block_size)
    else:
        step_fn = jax.jit(lambda x, w, y, state: value_and_grads(x, w, y, loss, state))

    pairs: dict[str, list] = {}
    for step_index, step in enumerate(case["steps"]):
        embeddings = jnp.asarray(np.asarray(step["embeddings"]), dtype=dtype)
        labels = jnp.asarray(np.asarray(step["labels"]), dtype=jnp.int32)
        got = step_fn(embeddings, weight, labels, state)
        state = got["state_after"]
        for name, expected in step["expected"].items():
            if expected is None:
                continue
            key = name if len(case["steps"]) == 1 else f"{name}@{step_index}"
            value = got[name]
            if isinstance(expected, dict):
                value = [value[k] for k in sorted(expected)]
                expected = [expected[k] for k in sorted(expected)]
            pairs[key] = [np.asarray(value, dtype=np.float64), expected]
    return pairs


def check_case(
    case: dict, dtype: str, mesh_devices: int, block_size: int | None = None
) -> tuple[bool, str]:
    """Checks one case (dense, or through the head on ``mesh_devices`` devices, ``block_size``
    classes at a time if given); returns ``(passed, the worst relative error of each field)``."""
    passed = True
    worst: dict[str, float] = {}
    for key, (got, expected) in run_case(case, dtype, mesh_devices, block_size).items():
        error, scale = field_error(got, expected)
        field = key.split("@")[0]
        worst[field] = max(worst.get(field, 0.0), error / scale)
        passed &= within_tolerance(error, scale, dtype)
    detail = " ".join(f"{k}={v:.1e}" for k, v in worst.items())
    return passed, detail
