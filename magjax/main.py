"""Trains a face-recognition model: ``python -m magjax.main --config CONFIG --workdir DIR``.

    python -m magjax.main --config configs/magface.py:demo --workdir runs/demo   # CPU demo
    python -m magjax.main --config configs/arcface.py:r100 --workdir gs://b/r100 \\
        --config.data.dir=/data/ms1mv2_tfds

``--config magjax:LOSS[:VARIANTS]`` (e.g. ``magjax:magface:demo``) names the recipe file
``configs/LOSS.py`` shipped with the package (installed as ``magjax/configs``), so that an
installed magjax trains from any directory, without a checkout.

Rerunning the same command resumes from the last checkpoint in ``--workdir``. On a Cloud TPU
pod slice or a SLURM cluster pass ``--multihost`` (``jax.distributed.initialize`` detects the
cluster); elsewhere give ``--coordinator_address``, ``--num_processes`` and ``--process_id``.
"""

import json
import logging
import os
import pathlib
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from magjax import train
from magjax.errors import UserError

RECIPE_PREFIX = "magjax:"

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MULTIHOST = flags.DEFINE_bool("multihost", False,
                               "Call jax.distributed.initialize() (auto-detects TPU/SLURM).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    forced = "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    if _CONFIG.value.cpu_devices and not forced:
        # Must happen before the backend starts; it only affects the CPU platform. A device
        # count forced through XLA_FLAGS (tests, users) takes precedence.
        jax.config.update("jax_num_cpu_devices", _CONFIG.value.cpu_devices)
    if _COORDINATOR.value:
        # Cross-process collectives on CPU need gloo; the setting is ignored on TPU/GPU. Asking
        # jax for its backend here would initialise it, which distributed.initialize forbids.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    elif _MULTIHOST.value:
        jax.distributed.initialize()
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if summary is not None and jax.process_index() == 0:
        print(json.dumps(summary, indent=2))


def recipe_file(name: str) -> pathlib.Path:
    """The shipped recipe file ``NAME.py``: ``magjax/configs`` when installed (setuptools maps
    the checkout's top-level ``configs/`` there), else ``configs/`` beside the package."""
    package = pathlib.Path(__file__).parent
    candidates = [package / "configs", package.parent / "configs"]
    for directory in candidates:
        if (directory / f"{name}.py").is_file():
            return directory / f"{name}.py"
    found = sorted({p.stem for d in candidates if d.is_dir() for p in d.glob("[a-z]*.py")})
    raise UserError(f"--config {RECIPE_PREFIX}{name}: no recipe {name!r}; shipped recipes: "
                    f"{', '.join(found) or 'none found'}")


def _recipe_path(value: str) -> str:
    name, _, variants = value[len(RECIPE_PREFIX):].partition(":")
    return str(recipe_file(name)) + (f":{variants}" if variants else "")


def expand_recipe_names(argv: list[str]) -> list[str]:
    """Rewrites ``--config magjax:LOSS[:VARIANTS]`` to ``--config <recipe file>[:VARIANTS]``."""
    expanded = list(argv)
    for index, arg in enumerate(expanded):
        if arg.startswith(f"--config={RECIPE_PREFIX}"):
            expanded[index] = "--config=" + _recipe_path(arg[len("--config="):])
        elif (arg == "--config" and index + 1 < len(expanded)
              and expanded[index + 1].startswith(RECIPE_PREFIX)):
            expanded[index + 1] = _recipe_path(expanded[index + 1])
    return expanded


if __name__ == "__main__":
    try:
        arguments = expand_recipe_names(sys.argv)
    except UserError as error:
        sys.exit(f"error: {error}")
    app.run(main, argv=arguments)
