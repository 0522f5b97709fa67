"""Every orbax call of magjax lives here, so that a later switch of API is a one-file change.

Two kinds of checkpoint:
* training checkpoints (the whole train state plus input-pipeline position), managed per step;
* inference models: the backbone variables plus a ``model.json`` naming the architecture and
  its input convention. ``python -m magjax.convert`` writes one, training exports one to
  ``WORKDIR/model`` at the end, and ``FaceEncoder`` / ``magjax.extract`` load both the same way.
"""

from __future__ import annotations

import json
import logging
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


def save_inference_model(directory: str | pathlib.Path, variables: Any, meta: dict) -> None:
    """Writes backbone ``variables`` (``{"params", "batch_stats"}``) and ``meta`` atomically.

    ``meta`` must hold at least ``arch`` and ``input_spec`` (see ``magjax.models``). With several
    processes every one must call this (orbax synchronises them); process 0 writes the files.
    """
    directory = pathlib.Path(directory).absolute()
    for key in ("arch", "input_spec"):
        if key not in meta:
            raise ValueError(f"inference model meta needs {key!r}, got keys {sorted(meta)}")
    directory.mkdir(parents=True, exist_ok=True)
    host_variables = jax.tree.map(np.asarray, jax.device_get(variables))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / MODEL_VARIABLES, host_variables, force=True)
    if jax.process_index() != 0:
        return
    # The meta is written last and through a rename: a directory with model.json is complete.
    files.write_text_atomically(directory / MODEL_META, json.dumps(meta, indent=2, sort_keys=True))


def load_inference_model(directory: str | pathlib.Path) -> tuple[Any, dict]:
    """Returns ``(variables, meta)`` written by :func:`save_inference_model` (host numpy arrays)."""
    directory = pathlib.Path(directory).absolute()
    meta_path = directory / MODEL_META
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{meta_path} not found: expected an inference model written by magjax.convert or "
            "by training (WORKDIR/model)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{meta_path} is not valid JSON ({error}): re-export or re-convert the "
                        "model") from None
    missing = [key for key in ("arch", "input_spec") if key not in meta] if isinstance(
        meta, dict) else ["arch", "input_spec"]
    if missing:
        raise UserError(f"{meta_path} lacks {', '.join(missing)}: not a magjax inference model")
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(directory / MODEL_VARIABLES)
    return variables, meta


class TrainCheckpoints:
    """Training checkpoints under ``WORKDIR/checkpoints``: asynchronous, atomic, last K kept.

    Each step directory holds the train state (``StandardSave``) and a JSON ``meta`` (input
    pipeline position, configuration facts). Orbax writes into a temporary directory and renames
    it when complete, so a crash mid-save leaves the previous checkpoint as the latest.
    """

    def __init__(self, workdir: str | pathlib.Path, *, every_steps: int, keep: int):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, save_interval_steps=every_steps,
                enable_async_checkpointing=True, create=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore_newest_intact(self, abstract_state: Any,
                              check_meta: Callable[[dict], None] | None = None
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
            raise UserError(f"no intact checkpoint in {self.directory}: " + "; ".join(
                f"step {step}: {_first_line(error)}" for step, error in damaged))
        return None

    def _set_aside(self, damaged: list[tuple[int, Exception]]) -> None:
        if not damaged:
            return
        aside = self.directory.parent / "checkpoints_damaged"
        for step, error in damaged:
            log.warning("checkpoint step %d in %s is damaged (%s): skipped, moved to %s", step,
                        self.directory, _first_line(error), aside)
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
        """Starts an asynchronous save if ``step`` is due (or ``force``); returns whether it did."""
        return self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave(meta)),
            force=force,
        )

    def restore_meta(self, step: int) -> dict:
        return self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

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
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return f"{type(error).__name__}: {text.splitlines()[0][:300]}"
