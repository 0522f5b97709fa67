"""The train step and what it is built from, apart from the loop that runs it.

``build_components`` turns a config into everything static a step needs (backbone, class-sharded
margin head, loss, optimizer and schedule); ``init_state`` / ``abstract_state`` give the train
state (a plain dict pytree: ``params`` (``backbone``, ``head``), ``batch_stats``,
``margin_state`` (AdaFace's EMA), ``opt_state`` and ``step``) in its shardings, allocated or as
shapes; ``make_train_step`` is the pure step ``(state, batch) -> (state, metrics)`` and
``jit_train_step`` jits it as training runs it. Randomness is derived from the seed folded with
the step, so nothing random is carried and a resumed run draws the same numbers.

Only jax, flax, optax and magjax's model, head, loss, optimizer and mesh modules are imported:
``python -m magjax.bench train|compile|head`` build the step on machines without the data and
checkpoint stack (tfds, grain, orbax/tensorstore, tensorboardX); ``magjax.train`` (the loop)
imports those itself.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from magjax import head, losses, models, optim, parallel
from magjax.errors import UserError


@dataclasses.dataclass
class Components:
    """Everything a train step needs besides the state (static under jit)."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    backbone: Any
    head: head.ClassShardedHead
    loss: losses.MarginLoss
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    input_spec: dict
    compute_dtype: Any


def margin_loss_from_config(loss_config: ml_collections.ConfigDict) -> losses.MarginLoss:
    """The loss ``loss_config.name`` with the config's hyper-parameters."""
    fields = dict(loss_config)
    return losses.MarginLoss.create(fields.pop("name"), **fields)


def build_components(
    config,
    mesh,
    num_classes: int,
    steps_per_epoch: int,
    total_steps: int,
    memory_bytes: int | None = None,
) -> Components:
    """Everything static a train step needs, from the config: the backbone (``model.*``), the
    class-sharded margin head over ``mesh`` (``loss.*``, ``head.*``), the learning-rate schedule
    and the optimizer (``optim.*``: SGD with momentum or AdamW, weight decay off the frozen
    parameters and, if ``optim.decay_batchnorm`` is off, off BatchNorm; the backbone gradient
    rounded to ``optim.grad_allreduce_dtype`` and clipped). ``steps_per_epoch`` and
    ``total_steps`` are in micro-batches, as arcface_torch counts warm-up and decay with
    ``gradient_acc``; ``Components.schedule`` gives each optimizer update the rate of the last
    micro-batch of its window (``optim.per_update_schedule``). ``memory_bytes``: a device's
    memory, for the head's rule when ``head.block_size`` is unset, where the devices cannot say
    (a topology compiled for on another host: ``bench compile``)."""
    if config.model.batchnorm_stats not in models.BATCHNORM_STATS:
        raise UserError(
            f"config.model.batchnorm_stats must be one of "
            f"{', '.join(models.BATCHNORM_STATS)}; "
            f"got {config.model.batchnorm_stats!r}"
        )
    compute_dtype = jnp.dtype(config.model.dtype)
    backbone = models.build(
        config.model.arch,
        dtype=compute_dtype,
        dropout=config.model.dropout,
        embedding_dim=config.model.embedding_dim,
    )
    loss = margin_loss_from_config(config.loss)
    margin_head = head.ClassShardedHead.from_config(config, mesh, loss, num_classes, memory_bytes)
    schedule = optim.per_update_schedule(
        optim.learning_rate_schedule(config.optim, steps_per_epoch, total_steps),
        config.optim.accumulate_steps,
    )
    abstract = jax.eval_shape(
        functools.partial(_init_variables, backbone, margin_head), jax.random.key(0)
    )
    trainable = {
        "backbone": models.trainable_mask(config.model.arch, abstract["params"]["backbone"]),
        "head": jax.tree.map(lambda _: True, abstract["params"]["head"]),
    }
    decay_mask = optim.weight_decay_mask(
        abstract["params"], trainable, config.optim.decay_batchnorm
    )
    tx = optim.make_optimizer(config.optim, schedule, decay_mask)
    return Components(
        config,
        mesh,
        backbone,
        margin_head,
        loss,
        tx,
        schedule,
        models.input_spec(config.model.arch),
        compute_dtype,
    )


def _init_variables(backbone, margin_head, key):
    k_backbone, k_head = jax.random.split(key)
    images = jnp.zeros((1, *models.INPUT_SHAPE), jnp.float32)
    backbone_vars = backbone.init(k_backbone, images, train=False)
    head_params, margin_state = margin_head.init(k_head)
    return {
        "params": {"backbone": backbone_vars["params"], "head": head_params},
        "batch_stats": backbone_vars.get("batch_stats", {}),
        "margin_state": margin_state,
    }


def _state_init_fn(components: Components):
    def init(key):
        variables = _init_variables(components.backbone, components.head, key)
        return {
            **variables,
            "opt_state": components.tx.init(variables["params"]),
            "step": jnp.zeros((), jnp.int32),
        }

    return init


def init_state(components: Components, key: jax.Array) -> dict:
    """The initial train state, created directly in its shards."""
    init = _state_init_fn(components)
    shardings = parallel.state_shardings(
        jax.eval_shape(init, key), components.mesh, head.is_class_rows
    )
    return jax.jit(init, out_shardings=shardings)(key)


def abstract_state(components: Components) -> dict:
    """The train state's shapes, dtypes and shardings, without allocating it (ahead-of-time
    compilation for devices this host does not have)."""
    shapes = jax.eval_shape(_state_init_fn(components), jax.random.key(0))
    shardings = parallel.state_shardings(shapes, components.mesh, head.is_class_rows)
    return jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        shapes,
        shardings,
    )


def abstract_batch(mesh: jax.sharding.Mesh, global_batch: int) -> dict:
    """Shapes of one global batch as the input pipeline feeds it (uint8 RGB images)."""
    sharding = parallel.batch_sharding(mesh)
    return {
        "image": jax.ShapeDtypeStruct(
            (global_batch, *models.INPUT_SHAPE), jnp.uint8, sharding=sharding
        ),
        "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=sharding),
    }


def jit_train_step(components: Components, base_key: jax.Array, state_shardings: Any):
    """``make_train_step`` jitted as training runs it: the state donated and kept in its
    shardings, the batch split over ``data``, the metrics replicated."""
    mesh = components.mesh
    return jax.jit(
        make_train_step(components, base_key),
        donate_argnums=(0,),
        in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
    )


def make_train_step(components: Components, base_key: jax.Array):
    """The pure train step ``(state, batch) -> (state, metrics)`` (jit it with shardings).

    The backbone runs data-parallel under plain jit (``models.apply_train``); with per-device
    BatchNorm statistics and ``optim.grad_allreduce_dtype`` other than float32 it runs under
    ``shard_map`` instead (:func:`magjax.models.per_device_forward`), so that the gradient
    all-reduce itself is in that dtype. The backbone's forward and the head's loss are
    differentiated and the optimizer applied by the head (``head.ClassShardedHead.update``),
    which moves its class rows as Partial FC and ``head.freeze_unsampled`` require.
    """
    c = components
    config = c.config
    skip_nonfinite = config.nan_policy == "skip"
    per_device = config.model.batchnorm_stats == "per_device"
    batchnorm_groups = c.mesh.shape[parallel.DATA_AXIS] if per_device else 1
    explicit_reduction = per_device and config.optim.grad_allreduce_dtype != "float32"

    def train_step(state, batch):
        step = state["step"]
        dropout_key, sample_key = jax.random.split(jax.random.fold_in(base_key, step))
        # float32 (float64 for a float64 model), then the compute dtype.
        images = models.preprocess(
            batch["image"], c.input_spec, jnp.promote_types(c.compute_dtype, jnp.float32)
        ).astype(c.compute_dtype)

        def objective(params, rows):
            backbone_vars = {"params": params["backbone"], "batch_stats": state["batch_stats"]}
            if explicit_reduction:
                embeddings, backbone_updates = models.per_device_forward(
                    c.backbone,
                    c.mesh,
                    backbone_vars,
                    images,
                    dropout_key=dropout_key,
                    gradient_dtype=config.optim.grad_allreduce_dtype,
                )
            else:
                embeddings, backbone_updates = models.apply_train(
                    c.backbone,
                    backbone_vars,
                    images,
                    dropout_key=dropout_key,
                    groups=batchnorm_groups,
                )
            out = c.head.loss(
                params["head"], state["margin_state"], embeddings, batch["label"], sample_key, rows
            )
            feature_norm = jnp.linalg.norm(embeddings.astype(jnp.float32), axis=-1).mean()
            return out, (backbone_updates.get("batch_stats", {}), feature_norm)

        params, opt_state, head_step = c.head.update(
            c.tx, objective, state["params"], state["opt_state"], batch["label"], sample_key
        )
        loss, grads = head_step.output.loss, head_step.grads
        batch_stats, feature_norm = head_step.aux
        margin_state = head_step.output.state
        metrics = {**head_step.output.metrics, "feature_norm": feature_norm}
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = {
            "params": params,
            "batch_stats": batch_stats,
            "margin_state": margin_state,
            "opt_state": opt_state,
            "step": step + 1,
        }
        if skip_nonfinite:
            old = {**state, "step": step + 1}
            new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, old)
        # The rate of the update this micro-batch's gradient goes into.
        metrics.update(
            loss=loss,
            grad_norm=grad_norm,
            nonfinite=~finite,
            lr=c.schedule(step // config.optim.accumulate_steps),
        )
        return new_state, metrics

    return train_step


def params_sha256(params: Any) -> str:
    """A hash of the parameter bytes, in a fixed (sorted-path) order."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(parallel.to_host(params))[0]
    for path, leaf in sorted(leaves, key=lambda item: parallel.path_name(item[0])):
        digest.update(parallel.path_name(path).encode())
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()
