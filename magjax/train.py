"""The training loop: data, checkpoints, evaluation, logging and preemption around the step.

Shape of a run (``train_and_evaluate``): mesh -> input pipeline -> model, head, optimizer ->
sharded train state (restored from ``WORKDIR/checkpoints`` when present) -> jitted
``train_step`` -> periodic logging, checkpoints and evaluation (:mod:`magjax.evaluators`) ->
final checkpoint, exported inference model (``WORKDIR/model``) and ``summary.json``. The step
and the state it updates are :mod:`magjax.train_step`'s; this module only orchestrates.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import pathlib
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np

# The data and checkpoint stack (tfds, grain, orbax/tensorstore, tensorboardX) is imported where
# used: magjax.step, which the benchmarks import, needs none of it.
from magjax import config_check, files, models, parallel, recipes
from magjax.errors import UserError
from magjax.train_step import (
    build_components,
    init_state,
    jit_train_step,
    params_sha256,
)

log = logging.getLogger(__name__)


def resolve_data_dir(config) -> pathlib.Path:
    """Where the prepared dataset is: ``data.dir``, the user's data, never built into (a missing
    or unprepared one fails now); without one, for a recipe with ``data.synthetic`` (the demo),
    its folder in the cache directory, which :func:`build_synthetic_data` fills. Reads only."""
    from magjax.data import prepared

    if config.data.dir:
        data_dir = pathlib.Path(config.data.dir)
        prepared.find_dataset_dir(data_dir)  # a missing or unprepared directory fails now
        return data_dir
    if config.data.synthetic:
        return pathlib.Path(recipes.synthetic_data_dir(dict(config.data.synthetic_options)))
    raise UserError(
        "config.data.dir is not set: pass --config.data.dir=/path/to/dataset prepared with "
        "`python -m magjax.data prepare --format rec|folder --src SRC --out DIR`, or run "
        "the CPU demo with --config configs/<loss>.py:demo"
    )


def build_synthetic_data(config, data_dir: pathlib.Path) -> None:
    """Builds the synthetic identities of ``config.data.synthetic_options`` into ``data_dir``
    (:func:`resolve_data_dir`'s cache folder) the first time, saying so in one line; a complete
    set built with the same options is reused as it is."""
    from magjax.data import builders, prepared

    options = dict(config.data.synthetic_options)
    if not (data_dir / prepared.MANIFEST).is_file():
        log.info(
            "building the synthetic identities (%s) in %s, once: about half a minute",
            ", ".join(f"{k}={v}" for k, v in sorted(options.items())),
            data_dir,
        )
    builders.prepare("synthetic", None, data_dir, progress=False, **options)


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
        log.warning(
            "%s received: saving a checkpoint after this step and stopping%s", self.requested, again
        )

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
            raise UserError(
                f"{workdir} holds a run with {key}={saved_meta['run'].get(key)!r}, "
                f"this config has {value!r}: use another --workdir"
            )


def backbone_variables(state: dict) -> dict:
    """The backbone's ``{"params", "batch_stats"}`` of the train state, on the host (what the
    inference model holds and the evaluators embed with)."""
    return parallel.to_host(
        {"params": state["params"]["backbone"], "batch_stats": state["batch_stats"]}
    )


def export_inference_model(directory: pathlib.Path, state: dict, config, step: int) -> None:
    """Writes the backbone of ``state`` as an inference model (``magjax.encoder`` loads it).
    Every process calls this: gathering sharded leaves and orbax's save are collectives."""
    from magjax import checkpoint

    checkpoint.save_inference_model(
        directory,
        backbone_variables(state),
        models.inference_meta(
            config.model.arch, config.model.embedding_dim, trained_with=config.loss.name, step=step
        ),
    )


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
                f"loss or gradients became NaN/Inf within steps [{bad[0]}, {bad[-1]}]"
            )
        mean = {
            k: float(np.mean([m[k] for m in fetched]))
            for k in fetched[0]
            if np.ndim(fetched[0][k]) == 0
        }
        mean["skipped_nonfinite"] = len(bad)
        elapsed = time.time() - self._since
        mean["images_per_s"] = len(fetched) * self.config.global_batch / max(elapsed, 1e-9)
        self._since = time.time()
        self.last_loss = mean["loss"]
        self.logger.write(step, mean, total_steps=self.total_steps)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> dict | None:
    """Trains (or resumes) in ``workdir``; returns the summary, or None when preempted.

    The config is validated first (:mod:`magjax.config_check`) and saved as
    ``WORKDIR/config.json``; a resumed run whose config differs from it is refused unless
    ``allow_config_change``. A finished run (summary written, last checkpoint at the final step)
    returns its saved summary and changes nothing.
    """
    from magjax import checkpoint, evaluators
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
    # Input and evaluation sets (a missing file fails now, not at the first evaluation).
    data_dir, pipeline = _open_input(config)
    evaluation_sets = evaluators.from_config(config, data_dir)
    steps_per_epoch = pipeline.steps_per_epoch
    total_steps = config.total_steps or max(int(config.epochs * steps_per_epoch), 1)

    # ----------------------------------------------------------------------------------------
    # The workdir: the saved config is compared, and a finished run is left as it is.
    checkpoints = checkpoint.TrainCheckpoints(
        workdir_path, every_steps=config.checkpoint.every_steps, keep=config.checkpoint.keep
    )
    latest = checkpoints.latest_step()
    config_check.save_or_compare(
        config,
        workdir_path,
        resuming=latest is not None,
        allow_change=allow_config_change,
        write=primary,
    )
    summary_path = workdir_path / SUMMARY_FILE
    if latest is not None and latest >= total_steps and summary_path.exists():
        checkpoints.close()
        log.info(
            "the run in %s is finished (step %d of %d); its results in %s are left as they are",
            workdir_path,
            latest,
            total_steps,
            summary_path,
        )
        return json.loads(summary_path.read_text())
    log.info("%s", run_description(config, data_dir, devices, steps_per_epoch, total_steps))
    if primary:  # a model export that a kill interrupted is finished, or its remains removed
        checkpoint.recover_inference_model(workdir_path / "model")
        checkpoint.recover_inference_model(workdir_path / "model_best")

    # ----------------------------------------------------------------------------------------
    # Model, head, optimizer and the train state, created in its shardings, then restored from
    # the newest intact checkpoint of this same run (on any device count).
    components = build_components(config, mesh, pipeline.num_classes, steps_per_epoch, total_steps)
    if components.head.block_for(config.global_batch):  # the dense head goes unsaid
        log.info("%s", components.head.describe(config.global_batch))
    init_key, base_key = jax.random.split(jax.random.key(config.seed))
    state = init_state(components, init_key)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    run = _Run(
        config,
        workdir_path,
        mesh,
        pipeline,
        checkpoints,
        total_steps,
        {"num_classes": pipeline.num_classes, "arch": config.model.arch, "loss": config.loss.name},
    )
    state, progress = _restore(run, state, latest)

    # ----------------------------------------------------------------------------------------
    # The step, the evaluators and the logs; then the loop.
    train_step = jit_train_step(components, base_key, shardings)
    suite = evaluators.Suite(
        evaluation_sets, config, components.input_spec, components.compute_dtype
    )
    logger = MetricsLogger(
        workdir_path,
        enabled=primary,
        progress_keys=(*components.loss.progress_metrics, "feature_norm"),
        restored_step=progress.restored_step,
    )
    train_metrics = _TrainMetrics(logger, config, total_steps, progress.last_loss)
    start_step, start_time, preemption = int(state["step"]), time.time(), _Preemption()
    try:
        state = _loop(run, state, train_step, suite, logger, train_metrics, preemption, progress)
    except NonFiniteLossError as error:
        raise _nonfinite_stop(error, checkpoints) from None
    finally:
        checkpoints.wait()
        checkpoints.close()
        preemption.restore()
        logger.close()
    if state is None:  # preempted: saved and stopped
        return None

    # ----------------------------------------------------------------------------------------
    # Results: the inference model and summary.json (written last: a run with it is finished).
    if start_step >= total_steps:
        # Resumed at the final step (the previous run stopped before writing its summary):
        # nothing to train, but the results are still to be computed.
        progress.evaluation = suite(backbone_variables(state))
    step = int(state["step"])
    export_inference_model(workdir_path / "model", state, config, step)
    summary = {
        "steps": step,
        "wall_s": time.time() - start_time,
        "final_loss": train_metrics.last_loss,
        "params_sha256": params_sha256(state["params"]),
        "devices": devices,
        "processes": jax.process_count(),
        "best": progress.best,
        **progress.evaluation,
    }
    summary.setdefault("verification", {})
    if primary:
        files.write_text_atomically(summary_path, summary_json(summary))
    return summary


@dataclasses.dataclass(frozen=True)
class _Run:
    """What the loop's pieces share about the run (fixed once the run is open)."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    mesh: jax.sharding.Mesh
    pipeline: Any
    checkpoints: Any
    total_steps: int
    facts: dict  # what a checkpoint must have been saved by (_check_same_run)

    @property
    def devices(self) -> int:
        return self.mesh.shape[parallel.DATA_AXIS]


@dataclasses.dataclass
class _Progress:
    """What the loop carries besides the train state (saved in each checkpoint's meta)."""

    best: dict | None = None  # {"metric", "value", "step"}: the best eval.best_metric so far
    last_loss: float = float("nan")
    restored_step: int = 0
    evaluation: dict = dataclasses.field(default_factory=dict)  # the latest results


def _open_input(config) -> tuple[pathlib.Path, Any]:
    """The data directory (the demo's synthetic identities built on first use) and the input
    pipeline, each process reading its own slice of every global batch; the config gets the
    data's directory and counts (config.json says where the data was, and evaluate finds it)."""
    from magjax.data import pipeline as data_pipeline

    data_dir = resolve_data_dir(config)
    if not config.data.dir:
        build_synthetic_data(config, data_dir)
    config.data.dir = str(data_dir)
    pipeline = data_pipeline.TrainPipeline(
        data_dir,
        global_batch=config.global_batch,
        seed=config.seed,
        augment=config.data.augment,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_workers=config.data.num_workers,
    )
    _take_dataset_counts(config, pipeline, data_dir)
    return data_dir, pipeline


def _restore(run: _Run, state: dict, latest: int | None) -> tuple[dict, _Progress]:
    """``state`` from the newest intact checkpoint of this run (if any), the pipeline's position
    and the loop's progress with it."""
    from magjax import evaluators

    progress = _Progress()
    if latest is None:
        return state, progress
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restored = run.checkpoints.restore_newest_intact(
        abstract,
        check_meta=functools.partial(_check_same_run, run_facts=run.facts, workdir=run.workdir),
    )
    if restored is None:
        return state, progress
    progress.restored_step, state, meta = restored
    run.pipeline.set_state(meta["pipeline"])
    progress.best = evaluators.saved_best(meta.get("best"))
    progress.last_loss = meta.get("last_loss", progress.last_loss)
    log.info(
        "resumed from step %d (saved on %d devices, now %d)",
        progress.restored_step,
        meta["devices"],
        run.devices,
    )
    return state, progress


def _loop(
    run: _Run,
    state: dict,
    train_step,
    suite,
    logger,
    train_metrics: _TrainMetrics,
    preemption: _Preemption,
    progress: _Progress,
) -> dict | None:
    """Steps to ``run.total_steps``, logging, evaluating (``model_best``) and checkpointing when
    due; returns the final state, or None when preempted (saved, then stopped)."""
    from magjax import evaluators

    config = run.config
    start_step = step = int(state["step"])
    start_time = time.time()
    while step < run.total_steps:
        batch = parallel.global_batch(run.mesh, next(run.pipeline))
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
        due_eval = is_due(step, config.eval.every_steps, run.total_steps)
        due_checkpoint = is_due(step, config.checkpoint.every_steps, run.total_steps)
        if (
            is_due(step, config.log_every_steps, run.total_steps)
            or due_eval
            or due_checkpoint
            or preemption.requested
        ):
            train_metrics.flush(step)
        if due_eval:
            progress.evaluation = suite(backbone_variables(state))
            if progress.evaluation:
                logger.write(step, evaluators.flatten(progress.evaluation), kind="eval")
                improved = suite.improved(progress.best, progress.evaluation, step)
                if improved:
                    progress.best = improved
                    export_inference_model(run.workdir / "model_best", state, config, step)
        if due_checkpoint or preemption.requested:
            meta = {
                "pipeline": run.pipeline.get_state(),
                "devices": run.devices,
                "run": run.facts,
                "best": progress.best,
                "step": step,
                "last_loss": _json_number(train_metrics.last_loss),
            }
            run.checkpoints.save(
                step, state, meta, force=preemption.requested or step == run.total_steps
            )
        if preemption.requested:
            run.checkpoints.wait()
            stopped = (
                f"stopped at step {step} after {preemption.requested} (checkpoint "
                f"saved); rerun the same command to resume"
            )
            log.warning("%s", stopped)
            if preemption.requested == "Ctrl-C":
                raise Interrupted(stopped)
            return None
    return state


def _nonfinite_stop(error: NonFiniteLossError, checkpoints) -> NonFiniteLossError:
    """The one-line error of a run stopped by non-finite losses: what is kept, and the fix."""
    checkpoints.wait()
    kept = checkpoints.latest_step()
    return NonFiniteLossError(
        f"{error}: stopped without saving them; "
        + (
            f"the checkpoint of step {kept} in {checkpoints.directory} is kept: lower "
            "--config.optim.lr and rerun with --allow-config-change to resume from it"
            if kept is not None
            else "no checkpoint was saved before them: lower --config.optim.lr"
        )
        + ", or set --config.nan_policy=skip to drop such updates"
    )


def describe_results(summary: dict, workdir: str | pathlib.Path) -> str:
    """What a finished run prints: its results in a few lines, where they are, and the commands
    a user runs next (evaluate, export, extract)."""
    workdir = pathlib.Path(workdir)
    loss = summary.get("final_loss")
    lines = [
        f"finished {summary['steps']} steps; final loss "
        f"{'NaN' if loss is None else format(loss, '.4f')}"
    ]
    for name, result in summary.get("verification", {}).items():
        lines.append(
            f"verification set {name}: accuracy {result['accuracy']:.4f} ± {result['std']:.4f}"
        )
    best = summary.get("best")
    if best:
        lines.append(
            f"best {best['metric']} {best['value']:.4f} at step {best['step']} (model "
            f"in {workdir / 'model_best'})"
        )
    quality = summary.get("quality")
    if quality:
        lines.append(
            f"quality: Spearman(feature norm, quality level) "
            f"{quality['spearman_norm_vs_quality']:.3f}"
        )
    lines += [
        f"results in {workdir / SUMMARY_FILE}, the model in {workdir / 'model'}; next:",
        f"  python -m magjax.evaluate --workdir {workdir}"
        "                  # the run's sets, or --bins lfw.bin,...",
        f"  python -m magjax.export --workdir {workdir} --out model.onnx",
        f"  python -m magjax.extract --workdir {workdir} --images FACES --out feats.npz",
    ]
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
    mismatches = [
        f"config.data.{key} is {config.data[key]} but the data has {value}"
        for key, value in actual.items()
        if config.data[key] is not None and config.data[key] != value
    ]
    if mismatches:
        named = f" (dataset {config.data.dataset!r})" if _named_dataset(config) else ""
        fix = " ".join(f"--config.data.{key}={value}" for key, value in actual.items())
        raise UserError(
            f"{data_dir}: " + "; ".join(mismatches) + f"{named}; if that is the "
            f"data you mean, name no dataset or pass {fix}"
        )
    unset = [key for key in actual if config.data[key] is None]
    if unset:
        log.info(
            "%s taken from the data in %s",
            ", ".join(f"{key}={actual[key]}" for key in unset),
            data_dir,
        )
    for key, value in actual.items():
        config.data[key] = value


def _named_dataset(config) -> bool:
    """Whether the config's counts are those of its named dataset (``configs/x.py:ms1mv3``)."""
    return recipes.DATASETS.get(config.data.dataset) == (
        config.data.num_classes,
        config.data.num_examples,
    )


def run_description(config, data_dir, devices: int, steps_per_epoch: int, total_steps: int) -> str:
    """One line of what is about to be trained: loss, backbone, data, batch, steps, devices."""
    platform = jax.devices()[0].platform
    return (
        f"training {config.loss.name} on {config.model.arch} ({config.model.dtype}): "
        f"{config.data.num_classes} classes, {config.data.num_examples} images in "
        f"{data_dir}{f' ({config.data.dataset})' if _named_dataset(config) else ''}; "
        f"global batch {config.global_batch}{_per_update(config)} on {devices} {platform} "
        f"device{'s' if devices > 1 else ''} x {jax.process_count()} process"
        f"{'es' if jax.process_count() > 1 else ''}; {total_steps} step"
        f"{'s' if total_steps > 1 else ''} "
        f"({total_steps / max(steps_per_epoch, 1):.3g} epochs of {steps_per_epoch})"
    )


def _per_update(config) -> str:
    acc = config.optim.accumulate_steps
    return f" ({acc} per update: {acc * config.global_batch} images)" if acc > 1 else ""
