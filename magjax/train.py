"""The training loop: data-parallel backbone, class-sharded margin head, orbax checkpoints.

Shape of a run (``train_and_evaluate``): mesh -> input pipeline -> model, head, optimizer ->
sharded train state (restored from ``WORKDIR/checkpoints`` when present) -> jitted
``train_step`` -> periodic logging, checkpoints and verification -> final checkpoint, exported
inference model (``WORKDIR/model``) and ``summary.json``.

The train state is a plain dict pytree: ``params`` (``backbone``, ``head``), ``batch_stats``,
``margin_state`` (AdaFace's EMA), ``opt_state`` and ``step``. Randomness is derived from the seed
folded with the step, so nothing random is carried and a resumed run draws the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import pathlib
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

# The train step (build_components, init_state, make_train_step) needs only jax, flax and optax:
# `python -m magjax.bench train|compile` build it on machines without the data and checkpoint
# stack (tfds, grain, orbax/tensorstore, tensorboardX), so the loop imports those itself.
from magjax import config_check, files, head, losses, models, optim, parallel, recipes
from magjax.errors import UserError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Components:
    """Everything a train step needs besides the state (static under jit)."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    backbone: Any
    head: head.MarginHead
    loss: losses.MarginLoss
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    input_spec: dict
    compute_dtype: Any


def margin_loss_from_config(loss_config: ml_collections.ConfigDict) -> losses.MarginLoss:
    """The loss ``loss_config.name`` with the config's hyper-parameters."""
    fields = dict(loss_config)
    return losses.MarginLoss.create(fields.pop("name"), **fields)


def build_components(config, mesh, num_classes: int, steps_per_epoch: int, total_steps: int
                     ) -> Components:
    """Everything static a train step needs, from the config: the backbone (``model.*``), the
    class-sharded margin head over ``mesh`` (``loss.*``, ``head.*``), the learning-rate schedule
    and the optimizer (``optim.*``: SGD with momentum or AdamW, weight decay off the frozen
    parameters and, if ``optim.decay_batchnorm`` is off, off BatchNorm; the backbone gradient
    rounded to ``optim.grad_allreduce_dtype`` and clipped). ``steps_per_epoch`` and
    ``total_steps`` are in micro-batches, as arcface_torch counts warm-up and decay with
    ``gradient_acc``; ``Components.schedule`` gives each optimizer update the rate of the last
    micro-batch of its window (``optim.per_update_schedule``)."""
    if config.model.batchnorm_stats not in models.BATCHNORM_STATS:
        raise UserError(f"config.model.batchnorm_stats must be one of "
                        f"{', '.join(models.BATCHNORM_STATS)}; "
                        f"got {config.model.batchnorm_stats!r}")
    compute_dtype = jnp.dtype(config.model.dtype)
    backbone = models.build(config.model.arch, dtype=compute_dtype, dropout=config.model.dropout,
                            embedding_dim=config.model.embedding_dim)
    loss = margin_loss_from_config(config.loss)
    margin_head = head.MarginHead(
        num_classes=num_classes, embedding_dim=config.model.embedding_dim, loss=loss, mesh=mesh,
        sample_rate=config.head.sample_rate, weight_init=config.head.weight_init,
        block_size=config.head.block_size)
    schedule = optim.per_update_schedule(
        optim.learning_rate_schedule(config.optim, steps_per_epoch, total_steps),
        config.optim.accumulate_steps)
    abstract = jax.eval_shape(functools.partial(_init_variables, backbone, margin_head, config),
                              jax.random.key(0))
    trainable = {"backbone": models.trainable_mask(config.model.arch,
                                                   abstract["params"]["backbone"]),
                 "head": jax.tree.map(lambda _: True, abstract["params"]["head"])}
    decay_mask = optim.weight_decay_mask(abstract["params"], trainable,
                                         config.optim.decay_batchnorm)
    tx = optim.make_optimizer(config.optim, schedule, decay_mask)
    return Components(config, mesh, backbone, margin_head, loss, tx, schedule,
                      models.input_spec(config.model.arch), compute_dtype)


def _init_variables(backbone, margin_head, config, key):
    k_backbone, k_head = jax.random.split(key)
    images = jnp.zeros((1, *models.INPUT_SHAPE), jnp.float32)
    backbone_vars = backbone.init(k_backbone, images, train=False)
    embeddings = jnp.zeros((margin_head.mesh.shape[parallel.DATA_AXIS],
                            config.model.embedding_dim), jnp.float32)
    labels = jnp.zeros((embeddings.shape[0],), jnp.int32)
    head_vars = margin_head.init(k_head, embeddings, labels)
    return {
        "params": {"backbone": backbone_vars["params"], "head": head_vars["params"]},
        "batch_stats": backbone_vars.get("batch_stats", {}),
        "margin_state": head_vars.get(head.MARGIN_STATE, {}),
    }


def _state_init_fn(components: Components):
    def init(key):
        variables = _init_variables(components.backbone, components.head, components.config, key)
        return {**variables, "opt_state": components.tx.init(variables["params"]),
                "step": jnp.zeros((), jnp.int32)}

    return init


def init_state(components: Components, key: jax.Array) -> dict:
    """The initial train state, created directly in its shards."""
    init = _state_init_fn(components)
    shardings = parallel.state_shardings(jax.eval_shape(init, key), components.mesh,
                                         head.is_class_rows)
    return jax.jit(init, out_shardings=shardings)(key)


def abstract_state(components: Components) -> dict:
    """The train state's shapes, dtypes and shardings, without allocating it (ahead-of-time
    compilation for devices this host does not have)."""
    shapes = jax.eval_shape(_state_init_fn(components), jax.random.key(0))
    shardings = parallel.state_shardings(shapes, components.mesh, head.is_class_rows)
    return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                 sharding=sharding),
                        shapes, shardings)


def abstract_batch(mesh: jax.sharding.Mesh, global_batch: int) -> dict:
    """Shapes of one global batch as the input pipeline feeds it (uint8 RGB images)."""
    sharding = parallel.batch_sharding(mesh)
    return {"image": jax.ShapeDtypeStruct((global_batch, *models.INPUT_SHAPE), jnp.uint8,
                                          sharding=sharding),
            "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=sharding)}


def jit_train_step(components: Components, base_key: jax.Array, state_shardings: Any):
    """``make_train_step`` jitted as training runs it: the state donated and kept in its
    shardings, the batch split over ``data``, the metrics replicated."""
    mesh = components.mesh
    return jax.jit(make_train_step(components, base_key), donate_argnums=(0,),
                   in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
                   out_shardings=(state_shardings, parallel.replicated(mesh)))


def per_device_forward(backbone, mesh: jax.sharding.Mesh, variables: dict, images: jax.Array,
                       *, dropout_key: jax.Array, gradient_dtype: Any) -> tuple[jax.Array, dict]:
    """``models.apply_train`` with per-device statistics (``groups`` = the devices of ``data``,
    the same values), run under ``jax.shard_map`` so that the backbone gradient is reduced
    explicitly: each device's gradient rounded to ``gradient_dtype`` and all-reduced in it
    (``parallel.reduce_gradient_in``), as DDP's gradient compression hooks do. Device ``i``
    draws dropout from ``split(dropout_key, devices)[i]``, as group ``i`` of ``apply_train``."""
    data = parallel.DATA_AXIS
    keys = jax.random.split(dropout_key, mesh.shape[data])

    def on_device(params, batch_stats, device_images, key):
        params = parallel.reduce_gradient_in(params, jnp.dtype(gradient_dtype))
        embeddings, updates = models.apply_train(
            backbone, {"params": params, "batch_stats": batch_stats}, device_images,
            dropout_key=key[0])
        return embeddings, jax.tree.map(lambda stat: stat[None], updates.get("batch_stats", {}))

    embeddings, batch_stats = jax.shard_map(
        on_device, mesh=mesh, in_specs=(P(), P(), P(data), P(data)),
        out_specs=(P(data), P(data)))(variables["params"], variables["batch_stats"], images, keys)
    # Device 0's running statistics, as apply_train's (DDP rank 0's buffers).
    return embeddings, {"batch_stats": jax.tree.map(lambda stat: stat[0], batch_stats)}


def make_train_step(components: Components, base_key: jax.Array, *,
                    sampled_rows: bool | None = None):
    """The pure train step ``(state, batch) -> (state, metrics)`` (jit it with shardings).

    The backbone runs data-parallel under plain jit (``models.apply_train``); with per-device
    BatchNorm statistics and ``optim.grad_allreduce_dtype`` other than float32 it runs under
    ``shard_map`` instead (:func:`per_device_forward`), so that the gradient all-reduce itself
    is in that dtype.

    Partial FC with ``head.freeze_unsampled`` (one update per step): the classes are sampled
    first, the loss is differentiated w.r.t. the sampled rows alone and the optimizer updates
    those rows of the centres and of their momentum, which are then put back; no dense
    ``[C, d]`` gradient exists (``head.sampled_rows_loss``). Otherwise the head's gradient is
    dense and, with ``freeze_unsampled``, the unsampled rows are restored after the update (the
    same result; ``sampled_rows=False`` forces that path, for the tests).
    """
    c = components
    config = c.config
    skip_nonfinite = config.nan_policy == "skip"
    freeze_unsampled = config.head.freeze_unsampled and config.head.sample_rate < 1.0
    per_device = config.model.batchnorm_stats == "per_device"
    batchnorm_groups = c.mesh.shape[parallel.DATA_AXIS] if per_device else 1
    explicit_reduction = per_device and config.optim.grad_allreduce_dtype != "float32"
    # optax.MultiSteps accumulates dense gradients: sampled rows change between micro-batches.
    if sampled_rows is None:
        sampled_rows = freeze_unsampled and config.optim.accumulate_steps == 1
    if sampled_rows:
        classes = c.head.num_classes
        sampler = head.partial_fc_sampler(c.mesh, classes, config.head.sample_rate)
        rows_loss = head.sampled_rows_loss(c.loss, c.mesh, classes, c.head.block_size)
        on_rows = head.on_class_rows(c.mesh)

    def train_step(state, batch):
        step = state["step"]
        dropout_key, sample_key = jax.random.split(jax.random.fold_in(base_key, step))
        # float32 (float64 for a float64 model), then the compute dtype.
        images = models.preprocess(batch["image"], c.input_spec,
                                   jnp.promote_types(c.compute_dtype, jnp.float32)
                                   ).astype(c.compute_dtype)

        if sampled_rows:
            all_rows = jnp.ones(batch["label"].shape, bool)
            index = sampler(batch["label"], all_rows, sample_key)
            params_in = on_rows(state["params"], index)
            opt_state_in = on_rows(state["opt_state"], index)
        else:
            params_in, opt_state_in = state["params"], state["opt_state"]

        def loss_fn(params):
            backbone_vars = {"params": params["backbone"], "batch_stats": state["batch_stats"]}
            if explicit_reduction:
                embeddings, backbone_updates = per_device_forward(
                    c.backbone, c.mesh, backbone_vars, images, dropout_key=dropout_key,
                    gradient_dtype=config.optim.grad_allreduce_dtype)
            else:
                embeddings, backbone_updates = models.apply_train(
                    c.backbone, backbone_vars, images, dropout_key=dropout_key,
                    groups=batchnorm_groups)
            if sampled_rows:
                out = rows_loss(embeddings, params["head"]["weight"], index, batch["label"],
                                all_rows, state["margin_state"])
                total, metrics, sampled, margin_state = out.loss, out.metrics, out.sampled, {
                    name: value.astype(state["margin_state"][name].dtype)
                    for name, value in out.state.items()}
            else:
                head_vars = {"params": params["head"]}
                if state["margin_state"]:
                    head_vars[head.MARGIN_STATE] = state["margin_state"]
                (total, metrics, sampled), head_updates = c.head.apply(
                    head_vars, embeddings, batch["label"], sample_key=sample_key,
                    mutable=[head.MARGIN_STATE])
                margin_state = head_updates.get(head.MARGIN_STATE, {})
            norms = jnp.linalg.norm(embeddings.astype(jnp.float32), axis=-1)
            metrics["feature_norm"] = norms.mean()
            return total, (metrics, sampled, backbone_updates.get("batch_stats", {}),
                           margin_state)

        (loss, (metrics, sampled, batch_stats, margin_state)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(params_in)
        updates, opt_state = c.tx.update(grads, opt_state_in, params_in)
        params = optax.apply_updates(params_in, updates)
        if sampled_rows:
            params = on_rows(state["params"], index, params)
            opt_state = on_rows(state["opt_state"], index, opt_state)
        elif freeze_unsampled:
            params = optim.keep_unsampled_rows(params, state["params"], sampled,
                                               head.is_class_rows)
            opt_state = optim.keep_unsampled_rows(opt_state, state["opt_state"], sampled,
                                                  head.is_class_rows)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = {"params": params, "batch_stats": batch_stats, "margin_state": margin_state,
                     "opt_state": opt_state, "step": step + 1}
        if skip_nonfinite:
            old = {**state, "step": step + 1}
            new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, old)
        # The rate of the update this micro-batch's gradient goes into.
        metrics.update(loss=loss, grad_norm=grad_norm, nonfinite=~finite,
                       lr=c.schedule(step // config.optim.accumulate_steps))
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


class Evaluator:
    """The evaluators ``config.eval`` names (:func:`magjax.evaluators.from_config`: ``.bin``
    verification, the quality set), run on the current backbone through one encoder."""

    def __init__(self, config, components: Components, data_dir: pathlib.Path):
        from magjax import evaluators
        from magjax.encoder import FaceEncoder

        self.evaluators = evaluators.from_config(config, data_dir)
        self.encoder = None
        if self.evaluators:
            abstract = {"params": None, "batch_stats": None}
            self.encoder = FaceEncoder(config.model.arch, abstract, components.input_spec,
                                       embedding_dim=config.model.embedding_dim,
                                       batch_size=config.eval.batch_size,
                                       dtype=components.compute_dtype)

    def __call__(self, state: dict) -> dict:
        if self.encoder is None:
            return {}
        self.encoder.variables = parallel.to_host({"params": state["params"]["backbone"],
                                                   "batch_stats": state["batch_stats"]})
        results: dict[str, Any] = {}
        for evaluator in self.evaluators:
            results.update(evaluator.run(self.encoder))
        return results


def resolve_data_dir(config) -> pathlib.Path:
    """The prepared dataset: ``data.dir``, the user's data, never built into; without one, a
    recipe with ``data.synthetic`` (the demo) builds its synthetic identities once under the
    cache directory. Either way a missing dataset is reported before anything else runs."""
    from magjax.data import builders

    if config.data.dir:
        data_dir = pathlib.Path(config.data.dir)
        builders.find_dataset_dir(data_dir)  # a missing or unprepared directory fails now
        return data_dir
    if config.data.synthetic:
        options = dict(config.data.synthetic_options)
        data_dir = pathlib.Path(recipes.synthetic_data_dir(options))
        if not (data_dir / builders.MANIFEST).is_file():
            log.info("building the synthetic identities (%s) in %s, once: about half a minute",
                     ", ".join(f"{k}={v}" for k, v in sorted(options.items())), data_dir)
        return pathlib.Path(builders.prepare("synthetic", None, data_dir, progress=False,
                                             **options))
    raise UserError(
        "config.data.dir is not set: pass --config.data.dir=/path/to/dataset prepared with "
        "`python -m magjax.data prepare --format rec|folder --src SRC --out DIR`, or run "
        "the CPU demo with --config configs/<loss>.py:demo")


def _check_evaluation_sets(config, data_dir: pathlib.Path) -> None:
    """Fails now, not at the first evaluation, when a set ``config.eval`` names is missing, and
    says in one line what will be evaluated (or that nothing will)."""
    from magjax import evaluators

    bins, quality_set = evaluators.configured_sets(config.eval, data_dir)
    missing = [str(path) for path in [*bins, quality_set] if path and not path.is_file()]
    if missing:
        raise UserError(f"config.eval: {', '.join(missing)} not found; name existing files in "
                        "--config.eval.bins / --config.eval.quality_set, or switch them off "
                        "with =none")
    if bins or quality_set:
        log.info("evaluating every %d steps on %s", config.eval.every_steps,
                 ", ".join(str(path) for path in [*bins, quality_set] if path))
    else:
        log.info("no evaluation: %s holds no held-out set and config.eval names none (prepare "
                 "with --holdout N, or pass --config.eval.bins=/path/to/lfw.bin)", data_dir)


class Interrupted(Exception):  # noqa: N818 (a stop asked for, not an error)
    """Ctrl-C stopped the training loop after saving a checkpoint (the command exits 130)."""


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss or the gradients became NaN/Inf with ``nan_policy='stop'``: one line naming the
    steps, the checkpoint kept and the fix (a ``UserError``: the recipe needs changing)."""


class _Preemption:
    """SIGTERM (Cloud TPU preemption, SLURM time limit) and Ctrl-C (SIGINT) ask the loop to
    finish its step (an evaluation due included), save and stop. A second Ctrl-C goes to the
    handler in place before (``magjax.main``'s stops at once; Python's raises
    KeyboardInterrupt): the checkpoints already saved are kept."""

    SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}

    def __init__(self):
        self.requested: str | None = None  # the name of the signal that asked
        self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            previous = self._previous[signal.SIGINT]
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        self.requested = self.SIGNALS[signum]
        again = " (Ctrl-C again stops at once)" if signum == signal.SIGINT else ""
        log.warning("%s received: saving a checkpoint after this step and stopping%s",
                    self.requested, again)

    def restore(self):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


SUMMARY_FILE = "summary.json"


def is_due(step: int, every: int, total_steps: int) -> bool:
    """The one "is it time" rule of the loop (logging, evaluation, checkpoints): every
    ``every`` steps, and at the last step."""
    return step % every == 0 or step == total_steps


def _check_same_run(saved_meta: dict, run_facts: dict, workdir: pathlib.Path) -> None:
    """A checkpoint of another run (other classes, backbone or loss) is refused."""
    for key, value in run_facts.items():
        if saved_meta["run"].get(key) != value:
            raise UserError(f"{workdir} holds a run with {key}={saved_meta['run'].get(key)!r}, "
                            f"this config has {value!r}: use another --workdir")


def export_inference_model(directory: pathlib.Path, state: dict, config, step: int) -> None:
    """Writes the backbone of ``state`` as an inference model (``magjax.encoder`` loads it).
    Every process calls this: gathering sharded leaves and orbax's save are collectives."""
    from magjax import checkpoint

    checkpoint.save_inference_model(
        directory,
        parallel.to_host({"params": state["params"]["backbone"],
                          "batch_stats": state["batch_stats"]}),
        models.inference_meta(config.model.arch, config.model.embedding_dim,
                              trained_with=config.loss.name, step=step))


class _TrainMetrics:
    """The train step's metrics, kept on device until a log is due (no per-step host sync),
    then checked for NaN/Inf, averaged and written."""

    def __init__(self, logger, config, total_steps: int, last_loss: float):
        self.logger, self.config, self.total_steps = logger, config, total_steps
        self.last_loss = last_loss
        self._pending: list[dict] = []
        self._since = time.time()

    def add(self, metrics: dict) -> None:
        self._pending.append(metrics)

    def flush(self, step: int) -> None:
        if not self._pending:
            return
        fetched = jax.device_get(self._pending)
        self._pending.clear()
        bad = [step - len(fetched) + i + 1 for i, m in enumerate(fetched) if m["nonfinite"]]
        if bad and self.config.nan_policy == "stop":
            raise NonFiniteLossError(
                f"loss or gradients became NaN/Inf within steps [{bad[0]}, {bad[-1]}]")
        mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]
                if np.ndim(fetched[0][k]) == 0}
        mean["skipped_nonfinite"] = len(bad)
        elapsed = time.time() - self._since
        mean["images_per_s"] = len(fetched) * self.config.global_batch / max(elapsed, 1e-9)
        self._since = time.time()
        self.last_loss = mean["loss"]
        self.logger.write(step, mean, total_steps=self.total_steps)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False) -> dict | None:
    """Trains (or resumes) in ``workdir``; returns the summary, or None when preempted.

    The config is validated first (:mod:`magjax.config_check`) and saved as
    ``WORKDIR/config.json``; a resumed run whose config differs from it is refused unless
    ``allow_config_change``. A finished run (summary written, last checkpoint at the final step)
    returns its saved summary and changes nothing.
    """
    from magjax import checkpoint
    from magjax.data import pipeline as data_pipeline
    from magjax.logs import MetricsLogger

    # ----------------------------------------------------------------------------------------
    # Config and mesh: every problem of the config is reported before anything runs.
    config = config.copy_and_resolve_references()  # counts from the data are filled in below
    config_check.validate(config, device_count=jax.device_count())
    workdir_path = pathlib.Path(workdir).absolute()
    workdir_path.mkdir(parents=True, exist_ok=True)
    primary = jax.process_index() == 0
    mesh = parallel.make_mesh(config.num_devices)
    devices = mesh.shape[parallel.DATA_AXIS]

    # ----------------------------------------------------------------------------------------
    # Input: each process reads its own slice of every global batch.
    data_dir = resolve_data_dir(config)
    config.data.dir = str(data_dir)  # config.json says where the data was (and evaluate finds it)
    pipeline = data_pipeline.TrainPipeline(
        data_dir, global_batch=config.global_batch, seed=config.seed,
        augment=config.data.augment, process_index=jax.process_index(),
        process_count=jax.process_count(), num_workers=config.data.num_workers)
    _take_dataset_counts(config, pipeline, data_dir)
    _check_evaluation_sets(config, data_dir)
    steps_per_epoch = pipeline.steps_per_epoch
    total_steps = config.total_steps or max(int(config.epochs * steps_per_epoch), 1)

    # ----------------------------------------------------------------------------------------
    # The workdir: the saved config is compared, and a finished run is left as it is.
    checkpoints = checkpoint.TrainCheckpoints(workdir_path, every_steps=config.checkpoint
                                              .every_steps, keep=config.checkpoint.keep)
    latest = checkpoints.latest_step()
    config_check.save_or_compare(config, workdir_path, resuming=latest is not None,
                                 allow_change=allow_config_change, write=primary)
    summary_path = workdir_path / SUMMARY_FILE
    if latest is not None and latest >= total_steps and summary_path.exists():
        checkpoints.close()
        log.info("the run in %s is finished (step %d of %d); its results in %s are left as "
                 "they are", workdir_path, latest, total_steps, summary_path)
        return json.loads(summary_path.read_text())
    log.info("%s", run_description(config, data_dir, devices, steps_per_epoch, total_steps))
    if primary:  # a model export that a kill interrupted is finished, or its remains removed
        for name in ("model", "model_best"):
            checkpoint.recover_inference_model(workdir_path / name)

    # ----------------------------------------------------------------------------------------
    # Model, head, optimizer and the train state, created in its shardings.
    components = build_components(config, mesh, pipeline.num_classes, steps_per_epoch,
                                  total_steps)
    init_key, base_key = jax.random.split(jax.random.key(config.seed))
    state = init_state(components, init_key)
    shardings = jax.tree.map(lambda x: x.sharding, state)

    # ----------------------------------------------------------------------------------------
    # Restore: the newest intact checkpoint of this same run, on any device count.
    run_facts = {"num_classes": pipeline.num_classes, "arch": config.model.arch,
                 "loss": config.loss.name}
    best = {"accuracy": None, "step": None}  # the best verification accuracy so far
    last_loss = float("nan")
    restored_step = 0
    if latest is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=x.sharding), state)
        restored = checkpoints.restore_newest_intact(
            abstract, check_meta=functools.partial(_check_same_run, run_facts=run_facts,
                                                   workdir=workdir_path))
        if restored is not None:
            restored_step, state, meta = restored
            pipeline.set_state(meta["pipeline"])
            best = meta.get("best", best)
            last_loss = meta.get("last_loss", last_loss)
            log.info("resumed from step %d (saved on %d devices, now %d)", restored_step,
                     meta["devices"], devices)

    # ----------------------------------------------------------------------------------------
    # The step, the evaluators and the logs.
    train_step = jit_train_step(components, base_key, shardings)
    evaluator = Evaluator(config, components, data_dir)
    logger = MetricsLogger(workdir_path, enabled=primary,
                           progress_keys=(*components.loss.progress_metrics, "feature_norm"),
                           restored_step=restored_step)
    train_metrics = _TrainMetrics(logger, config, total_steps, last_loss)
    preemption = _Preemption()
    start_step = step = int(state["step"])
    start_time = time.time()
    evaluation: dict = {}

    # ----------------------------------------------------------------------------------------
    # The loop: log, evaluate and checkpoint when due; on SIGTERM save and stop.
    try:
        while step < total_steps:
            batch = parallel.global_batch(mesh, next(pipeline))
            if step == start_step:
                log.info("compiling the train step (the first step; a minute or so on a CPU)")
            state, metrics = train_step(state, batch)
            if step == start_step:
                # The first step includes the compilation: the ETA is timed from its end.
                jax.block_until_ready(metrics)
                log.info("compiled and ran the first step in %.0f s", time.time() - start_time)
                logger.start_clock(step + 1)
            train_metrics.add(metrics)
            step += 1
            due_eval = is_due(step, config.eval.every_steps, total_steps)
            due_checkpoint = is_due(step, config.checkpoint.every_steps, total_steps)
            if (is_due(step, config.log_every_steps, total_steps) or due_eval
                    or due_checkpoint or preemption.requested):
                train_metrics.flush(step)
            if due_eval:
                evaluation = evaluator(state)
                if evaluation:
                    logger.write(step, _flatten(evaluation), kind="eval")
                    accuracy = _first_accuracy(evaluation)
                    if accuracy is not None and (best["accuracy"] is None
                                                 or accuracy > best["accuracy"]):
                        best = {"accuracy": accuracy, "step": step}
                        export_inference_model(workdir_path / "model_best", state, config, step)
            if due_checkpoint or preemption.requested:
                meta = {"pipeline": pipeline.get_state(), "devices": devices, "run": run_facts,
                        "best": best, "step": step,
                        "last_loss": _json_number(train_metrics.last_loss)}
                checkpoints.save(step, state, meta,
                                 force=preemption.requested or step == total_steps)
            if preemption.requested:
                checkpoints.wait()
                stopped = (f"stopped at step {step} after {preemption.requested} (checkpoint "
                           f"saved); rerun the same command to resume")
                log.warning("%s", stopped)
                if preemption.requested == "Ctrl-C":
                    raise Interrupted(stopped)
                return None
    except NonFiniteLossError as error:
        checkpoints.wait()
        kept = checkpoints.latest_step()
        raise NonFiniteLossError(
            f"{error}: stopped without saving them; "
            + (f"the checkpoint of step {kept} in {checkpoints.directory} is kept: lower "
               "--config.optim.lr and rerun with --allow-config-change to resume from it"
               if kept is not None else "no checkpoint was saved before them: lower "
               "--config.optim.lr")
            + ", or set --config.nan_policy=skip to drop such updates") from None
    finally:
        checkpoints.wait()
        checkpoints.close()
        preemption.restore()
        logger.close()

    # ----------------------------------------------------------------------------------------
    # Results: the inference model and summary.json (written last: a run with it is finished).
    if start_step >= total_steps:
        # Resumed at the final step (the previous run stopped before writing its summary):
        # nothing to train, but the results are still to be computed.
        evaluation = evaluator(state)
    export_inference_model(workdir_path / "model", state, config, step)
    summary = {
        "steps": step,
        "wall_s": time.time() - start_time,
        "final_loss": train_metrics.last_loss,
        "params_sha256": params_sha256(state["params"]),
        "devices": devices,
        "processes": jax.process_count(),
        "best": best if best["accuracy"] is not None else None,
        **evaluation,
    }
    summary.setdefault("verification", {})
    if primary:
        files.write_text_atomically(summary_path, summary_json(summary))
    return summary


def describe_results(summary: dict, workdir: str | pathlib.Path) -> str:
    """What a finished run prints: its results in a few lines, where they are, and the commands
    a user runs next (evaluate, export, extract)."""
    workdir = pathlib.Path(workdir)
    loss = summary.get("final_loss")
    lines = [f"finished {summary['steps']} steps; final loss "
             f"{'NaN' if loss is None else format(loss, '.4f')}"]
    for name, result in summary.get("verification", {}).items():
        lines.append(f"verification set {name}: accuracy {result['accuracy']:.4f} ± "
                     f"{result['std']:.4f}")
    if summary.get("best"):
        lines.append(f"best accuracy {summary['best']['accuracy']:.4f} at step "
                     f"{summary['best']['step']} (model in {workdir / 'model_best'})")
    quality = summary.get("quality")
    if quality:
        lines.append(f"quality: Spearman(feature norm, quality level) "
                     f"{quality['spearman_norm_vs_quality']:.3f}")
    lines += [f"results in {workdir / SUMMARY_FILE}, the model in {workdir / 'model'}; next:",
              f"  python -m magjax.evaluate --workdir {workdir}"
              "                  # the run's sets, or --bins lfw.bin,...",
              f"  python -m magjax.export --workdir {workdir} --out model.onnx",
              f"  python -m magjax.extract --workdir {workdir} --images FACES --out feats.npz"]
    return "\n".join(lines)


def summary_json(summary: dict) -> str:
    """``summary`` as strict JSON: a non-finite number (a NaN loss) is written as null."""
    return json.dumps(_json_number(summary), indent=2, allow_nan=False)


def _json_number(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, Inf) replaced by None, recursively."""
    if isinstance(value, dict):
        return {k: _json_number(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_number(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _take_dataset_counts(config: ml_collections.ConfigDict, pipeline, data_dir) -> None:
    """Checks the class and image counts the config names against the data; fills in unset ones.

    The counts are set by naming a dataset (``configs/arcface.py:ms1mv3``) or by hand; a
    mismatch is reported for both counts at once. Unset counts are taken from the data.
    """
    actual = {"num_classes": pipeline.num_classes, "num_examples": pipeline.num_examples}
    mismatches = [f"config.data.{key} is {config.data[key]} but the data has {value}"
                  for key, value in actual.items()
                  if config.data[key] is not None and config.data[key] != value]
    if mismatches:
        named = f" (dataset {config.data.dataset!r})" if _named_dataset(config) else ""
        fix = " ".join(f"--config.data.{key}={value}" for key, value in actual.items())
        raise UserError(f"{data_dir}: " + "; ".join(mismatches) + f"{named}; if that is the "
                        f"data you mean, name no dataset or pass {fix}")
    unset = [key for key in actual if config.data[key] is None]
    if unset:
        log.info("%s taken from the data in %s", ", ".join(
            f"{key}={actual[key]}" for key in unset), data_dir)
    for key, value in actual.items():
        config.data[key] = value


def _named_dataset(config) -> bool:
    """Whether the config's counts are those of its named dataset (``configs/x.py:ms1mv3``)."""
    return recipes.DATASETS.get(config.data.dataset) == (config.data.num_classes,
                                                         config.data.num_examples)


def run_description(config, data_dir, devices: int, steps_per_epoch: int,
                    total_steps: int) -> str:
    """One line of what is about to be trained: loss, backbone, data, batch, steps, devices."""
    platform = jax.devices()[0].platform
    return (f"training {config.loss.name} on {config.model.arch} ({config.model.dtype}): "
            f"{config.data.num_classes} classes, {config.data.num_examples} images in "
            f"{data_dir}{f' ({config.data.dataset})' if _named_dataset(config) else ''}; "
            f"global batch {config.global_batch}{_per_update(config)} on {devices} {platform} "
            f"device{'s' if devices > 1 else ''} x {jax.process_count()} process"
            f"{'es' if jax.process_count() > 1 else ''}; {total_steps} step"
            f"{'s' if total_steps > 1 else ''} "
            f"({total_steps / max(steps_per_epoch, 1):.3g} epochs of {steps_per_epoch})")


def _per_update(config) -> str:
    acc = config.optim.accumulate_steps
    return f" ({acc} per update: {acc * config.global_batch} images)" if acc > 1 else ""


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def _first_accuracy(evaluation: dict) -> float | None:
    for result in evaluation.get("verification", {}).values():
        return result["accuracy"]
    return None
