"""Every orbax call of magjax lives here, so that a later switch of API is a one-file change.

Two kinds of checkpoint:
* training checkpoints (the whole train state plus input-pipeline position), managed per step;
* inference models: the backbone variables plus a ``model.json`` naming the architecture and
  its input convention. ``python -m magjax.convert`` writes one, training exports one to
  ``WORKDIR/model`` at the end, and ``FaceEncoder`` / ``magjax.extract`` load both the same way.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

MODEL_META = "model.json"
MODEL_VARIABLES = "variables"


def save_inference_model(directory: str | pathlib.Path, variables: Any, meta: dict) -> None:
    """Writes backbone ``variables`` (``{"params", "batch_stats"}``) and ``meta`` atomically.

    ``meta`` must hold at least ``arch`` and ``input_spec`` (see ``magjax.models``).
    """
    directory = pathlib.Path(directory).absolute()
    for key in ("arch", "input_spec"):
        if key not in meta:
            raise ValueError(f"inference model meta needs {key!r}, got keys {sorted(meta)}")
    directory.mkdir(parents=True, exist_ok=True)
    host_variables = jax.tree.map(np.asarray, jax.device_get(variables))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / MODEL_VARIABLES, host_variables, force=True)
    # The meta is written last and through a rename: a directory with model.json is complete.
    tmp = directory / (MODEL_META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    tmp.replace(directory / MODEL_META)


def load_inference_model(directory: str | pathlib.Path) -> tuple[Any, dict]:
    """Returns ``(variables, meta)`` written by :func:`save_inference_model` (host numpy arrays)."""
    directory = pathlib.Path(directory).absolute()
    meta_path = directory / MODEL_META
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{meta_path} not found: expected an inference model written by magjax.convert or "
            "by training (WORKDIR/model)"
        )
    meta = json.loads(meta_path.read_text())
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(directory / MODEL_VARIABLES)
    return variables, meta
