"""Every orbax call of magjax lives here, so that a later switch of API is a one-file change.

Two kinds of checkpoint:
* training checkpoints (the whole train state plus input-pipeline position), managed per step;
* inference models: the backbone variables plus a ``model.json`` naming the architecture and
  its input convention, and the directory's ``format`` (:data:`MODEL_FORMAT`; a file without it
  predates the key and is read as version 1, a format this magjax does not know is refused).
  Loading refuses variables that cannot be read (cut short) or that no trained network holds
  (NaN/Inf, negative BatchNorm variances), in one line naming the file and the variable.
  ``python -m magjax.convert`` writes one, training exports one to ``WORKDIR/model`` at the end,
  and ``FaceEncoder`` / ``magjax.extract`` load both the same way.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from magjax import files
from magjax.errors import UserError

log = logging.getLogger(__name__)

MODEL_META = "model.json"
MODEL_VARIABLES = "variables"
# model.json's "format": what a reader must understand to load the directory. Files written
# before the key existed (no "format") are version 1; a later layout gets a new number, which an
# older magjax then refuses instead of loading it wrongly.
MODEL_FORMAT = "magjax-model/1"


def save_inference_model(directory: str | pathlib.Path, variables: Any, meta: dict) -> None:
    """Writes backbone ``variables`` (``{"params", "batch_stats"}``) and ``meta`` as the
    inference model ``directory``, replacing the one there so that a kill at any moment leaves
    one loadable model at ``directory`` or, for the instant of the swap, beside it.

    The new model is written whole into ``DIR.new/`` (``model.json`` last: a directory with it is
    complete), then swapped in by renames: ``DIR`` -> ``DIR.old``, ``DIR.new`` -> ``DIR``, and
    ``DIR.old`` is deleted. A kill between the two renames leaves no ``DIR`` but two complete
    models beside it: :func:`readable_model_dir` (every loader) reads ``DIR.new``, and the next
    save (or :func:`recover_inference_model`) finishes the swap. Files in ``DIR`` that are not
    part of the model (an ONNX export put there) move into the new directory with it.

    ``meta`` must hold at least ``arch`` and ``input_spec`` (see ``magjax.models``). With several
    processes every one must call this (orbax synchronises them); process 0 writes ``model.json``
    and does the renames.
    """
    global _saves
    directory = pathlib.Path(directory).absolute()
    for key in ("arch", "input_spec"):
        if key not in meta:
            raise ValueError(f"inference model meta needs {key!r}, got keys {sorted(meta)}")
    new = _aside(directory, NEW_SUFFIX)
    primary = jax.process_index() == 0
    if primary:
        recover_inference_model(directory)  # also removes a DIR.new cut short by a kill
    _saves += 1
    if jax.process_count() > 1:  # nobody writes into DIR.new before process 0 cleared it
        ocp.multihost.sync_global_processes(f"magjax_inference_model_cleared_{_saves}")
    host_variables = jax.tree.map(np.asarray, jax.device_get(variables))
    try:
        new.mkdir(parents=True, exist_ok=True)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(new / MODEL_VARIABLES, host_variables, force=True)
        if not primary:
            return
        # The meta is written last, through a rename: a directory with model.json is complete.
        files.write_text_atomically(
            new / MODEL_META, json.dumps({**meta, "format": MODEL_FORMAT}, indent=2, sort_keys=True)
        )
    except Exception as error:
        if not is_disk_full(error):
            raise
        if primary:
            shutil.rmtree(new, ignore_errors=True)  # give the space back
        previous = readable_model_dir(directory)
        raise DiskFullError(
            f"the disk is full: the model could not be written to {directory}; "
            + (
                f"the previous one in {previous} is kept. "
                if previous
                else "nothing else was changed. "
            )
            + "Free space and rerun the same command"
        ) from error
    _swap_in(directory)


# Names of the two directories a model swap puts beside DIR (see save_inference_model).
NEW_SUFFIX = ".new"
OLD_SUFFIX = ".old"
_saves = 0  # numbers the barriers of save_inference_model (orbax wants each name once)


def _aside(directory: pathlib.Path, suffix: str) -> pathlib.Path:
    return directory.with_name(directory.name + suffix)


def _is_complete(directory: pathlib.Path) -> bool:
    return (directory / MODEL_META).is_file()


def _remove_model(directory: pathlib.Path) -> None:
    """Deletes a model directory, ``model.json`` first: one cut short never looks complete."""
    (directory / MODEL_META).unlink(missing_ok=True)
    shutil.rmtree(directory)


def _swap_in(directory: pathlib.Path) -> None:
    """Puts the complete ``DIR.new`` in the place of ``DIR`` (see ``save_inference_model``)."""
    new, old = _aside(directory, NEW_SUFFIX), _aside(directory, OLD_SUFFIX)
    if old.exists():  # left by a swap killed after its second rename: DIR is complete
        _remove_model(old)
    if directory.exists():
        for entry in directory.iterdir():  # what is not the model's goes with the new model
            if entry.name not in (MODEL_META, MODEL_VARIABLES) and not (new / entry.name).exists():
                os.rename(entry, new / entry.name)
        os.rename(directory, old)
    os.rename(new, directory)
    if old.exists():
        _remove_model(old)


def readable_model_dir(directory: str | pathlib.Path) -> pathlib.Path | None:
    """Where the model ``directory`` can be read: itself when complete, else the complete
    ``DIR.new`` or ``DIR.old`` a swap killed between its renames left (``save_inference_model``);
    None when there is none. Reading never renames: a reader may share the workdir with a run."""
    directory = pathlib.Path(directory)
    for candidate in (directory, _aside(directory, NEW_SUFFIX), _aside(directory, OLD_SUFFIX)):
        if _is_complete(candidate):
            return candidate
    return None


def recover_inference_model(directory: str | pathlib.Path) -> None:
    """Finishes a swap of ``save_inference_model`` that a kill interrupted, and removes a
    ``DIR.new`` that a kill cut short, so that ``directory`` is the newest complete model.
    Process 0 only (renames); training calls it for ``model`` and ``model_best`` at start."""
    directory = pathlib.Path(directory).absolute()
    new, old = _aside(directory, NEW_SUFFIX), _aside(directory, OLD_SUFFIX)
    if _is_complete(new):
        log.warning(
            "%s: finishing the replacement of the model a killed run interrupted", directory
        )
        _swap_in(directory)
    elif new.exists():
        shutil.rmtree(new)  # cut short while being written: DIR (if any) is unchanged
    if not directory.exists() and _is_complete(old):
        os.rename(old, directory)
    elif old.exists() and _is_complete(directory):
        _remove_model(old)


def load_inference_model(directory: str | pathlib.Path) -> tuple[Any, dict]:
    """Returns ``(variables, meta)`` written by :func:`save_inference_model` (host numpy arrays)."""
    directory = pathlib.Path(directory).absolute()
    directory = readable_model_dir(directory) or directory  # a swap killed half-way
    meta_path = directory / MODEL_META
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{meta_path} not found: expected an inference model written by magjax.convert or "
            "by training (WORKDIR/model)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(
            f"{meta_path} is not valid JSON ({error}): re-export or re-convert the model"
        ) from None
    missing = (
        [key for key in ("arch", "input_spec") if key not in meta]
        if isinstance(meta, dict)
        else ["arch", "input_spec"]
    )
    if missing:
        raise UserError(f"{meta_path} lacks {', '.join(missing)}: not a magjax inference model")
    if meta.get("format", MODEL_FORMAT) != MODEL_FORMAT:
        raise UserError(
            f"{meta_path}: format {meta['format']!r}, but this magjax reads "
            f"{MODEL_FORMAT!r} only: written by a newer magjax? upgrade magjax"
        )
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            variables = checkpointer.restore(directory / MODEL_VARIABLES)
    except Exception as error:  # noqa: BLE001 (any failure to read is a damaged model)
        raise UserError(
            f"{directory / MODEL_VARIABLES}: cannot be read ({_first_line(error)}): the model "
            "files are damaged or incomplete (cut short, or a copy still in progress); export "
            "or convert the model again"
        ) from error
    check_variable_values(variables, directory / MODEL_VARIABLES)
    return variables, meta


def check_variable_values(variables: Any, where: str | pathlib.Path) -> None:
    """Refuses variables no trained network holds, naming the variable: NaN or Inf anywhere, or
    a BatchNorm variance (``batch_stats .../var``) below zero. Such a model evaluates to chance
    (``XNorm nan``) without another sign."""
    for path, value in jax.tree_util.tree_flatten_with_path(variables)[0]:
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating):
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            check_tensor_values(name, value, str(where))


def check_tensor_values(name: str, value: np.ndarray, where: str) -> None:
    """Refuses a tensor that no trained network holds, naming it: NaN or Inf anywhere (a
    diverged run or a damaged file, which evaluates to chance), or a BatchNorm running variance
    below zero (its square root is NaN). ``name`` is the tensor's key (``running_var`` /
    ``batch_stats .../var`` mark variances); ``where`` names the file."""
    finite = np.isfinite(value)
    if not finite.all():
        bad = int(value.size - np.count_nonzero(finite))
        raise UserError(
            f"{where}: tensor {name!r} holds {bad} non-finite values (NaN or Inf) of "
            f"{value.size}: the weights are damaged or come from a diverged run; refused"
        )
    if name.endswith(("running_var", "/var")) and (value < 0).any():
        raise UserError(
            f"{where}: BatchNorm variance {name!r} holds {int((value < 0).sum())} negative "
            f"values (minimum {float(value.min()):.4g}); a variance is never below 0: refused"
        )


class TrainCheckpoints:
    """Training checkpoints under ``WORKDIR/checkpoints``: asynchronous, atomic, last K kept.

    Each step directory holds the train state (``StandardSave``) and a JSON ``meta`` (input
    pipeline position, configuration facts). Orbax writes into a temporary directory and renames
    it when complete, so a crash mid-save leaves the previous checkpoint as the latest.
    """

    def __init__(self, workdir: str | pathlib.Path, *, every_steps: int, keep: int):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self._saving: int | None = None  # the step of the asynchronous save under way
        self._failed = False  # a save failed for lack of space: nothing more is written
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                save_interval_steps=every_steps,
                enable_async_checkpointing=True,
                create=True,
                # a save cut short (a kill, a full disk) leaves STEP.orbax-checkpoint-tmp
                cleanup_tmp_directories=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore_newest_intact(
        self, abstract_state: Any, check_meta: Callable[[dict], None] | None = None
    ) -> tuple[int, Any, dict] | None:
        """``(step, state, meta)`` of the newest checkpoint that restores; None if there is none.

        A damaged checkpoint (a truncated or missing file, a missing ``meta``, an empty step
        directory) is skipped with a warning naming it and why, and moved aside to
        ``WORKDIR/checkpoints_damaged/`` (kept for inspection; its step can be saved again).
        ``check_meta(meta)`` runs before the state is read and what it raises (a different run)
        is not taken for damage. If every checkpoint is damaged, a ``UserError`` lists them.
        """
        damaged = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                meta = self.restore_meta(step)
            except Exception as error:  # noqa: BLE001 (any failure to read is damage)
                damaged.append((step, error))
                continue
            if check_meta is not None:
                check_meta(meta)
            try:
                state, meta = self.restore(step, abstract_state)
            except Exception as error:  # noqa: BLE001 (any failure to read is damage)
                damaged.append((step, error))
                continue
            self._set_aside(damaged)
            return step, state, meta
        if damaged:
            raise UserError(
                f"no intact checkpoint in {self.directory}: "
                + "; ".join(f"step {step}: {_first_line(error)}" for step, error in damaged)
            )
        return None

    def _set_aside(self, damaged: list[tuple[int, Exception]]) -> None:
        if not damaged:
            return
        aside = self.directory.parent / "checkpoints_damaged"
        for step, error in damaged:
            log.warning(
                "checkpoint step %d in %s is damaged (%s): skipped, moved to %s",
                step,
                self.directory,
                _first_line(error),
                aside,
            )
            if jax.process_index() == 0:
                aside.mkdir(exist_ok=True)
                target = aside / str(step)
                if target.exists():  # the same step was set aside before
                    target = aside / f"{step}.{len(list(aside.glob(f'{step}.*'))) + 1}"
                shutil.move(self.directory / str(step), target)
        if jax.process_count() > 1:  # every process sees the moves before it lists the steps
            ocp.multihost.sync_global_processes("magjax_damaged_checkpoints_set_aside")
        self._manager.reload()

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Starts an asynchronous save if ``step`` is due (or ``force``); returns whether it did.

        A full disk (here, or in the previous save, which orbax finishes first) raises
        :class:`DiskFullError`; see :meth:`wait`."""
        try:
            started = self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=force,
            )
        except Exception as error:
            self._raise_if_disk_full(error, self._saving if self._saving is not None else step)
            raise
        if started:
            self._saving = step
        return started

    def restore_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores into ``abstract_state`` (ShapeDtypeStructs carrying the target shardings).

        ``strict=False`` lets orbax pad or truncate: the class-centre matrix is padded to a
        multiple of the device count, so a checkpoint written on N devices restores on M with
        the zero padding rows re-laid out (callers check that the class count is unchanged).
        """
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state, strict=False),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        """Waits for the save under way. A full disk raises :class:`DiskFullError` in one line
        (the step it could not write, the newest checkpoint kept), not orbax's tracebacks; the
        incomplete step's files are removed, to give the space back."""
        if self._failed:
            return
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            self._raise_if_disk_full(error, self._saving)
            raise
        self._saving = None

    def close(self) -> None:
        try:
            self._manager.close()
        except Exception:
            if not self._failed:  # after a full disk orbax reports the same failure again
                raise

    def _raise_if_disk_full(self, error: Exception, step: int | None) -> None:
        if not is_disk_full(error):
            return
        self._failed = True
        # orbax's other writes of that step are still under way: let them end first (closing
        # reports the same failure again)
        with contextlib.suppress(Exception):
            self._manager.close()
        if jax.process_index() == 0:
            for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
        complete = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
        kept = (
            f"the checkpoint of step {complete[-1]} is kept"
            if complete
            else "no earlier checkpoint exists"
        )
        raise DiskFullError(
            f"the disk is full: checkpoint step {step} could not be written in "
            f"{self.directory} (its partial files are removed) and nothing else is lost: "
            f"{kept}. Free space and rerun the same command to resume (orbax's error is in "
            "train.log)"
        ) from error


class DiskFullError(UserError):
    """A checkpoint could not be written for lack of space (or quota)."""


def is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from, says the disk or the quota is full:
    an ``OSError`` ENOSPC / EDQUOT, or tensorstore's error (orbax's writes) that quotes it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if any(
            sign in text
            for sign in ("No space left on device", "Disk quota exceeded", "os_error_code='28'")
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return f"{type(error).__name__}: {text.splitlines()[0][:300]}"
