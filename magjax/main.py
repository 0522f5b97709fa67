"""Trains a face-recognition model: ``python -m magjax.main --config CONFIG --workdir DIR``.

    python -m magjax.main --config configs/magface.py:demo --workdir runs/demo   # CPU demo
    python -m magjax.main --config configs/arcface.py:r100 --workdir gs://b/r100 \\
        --config.data.dir=/data/ms1mv2_tfds

Rerunning the same command resumes from the last checkpoint in ``--workdir``. On a Cloud TPU
pod slice or a SLURM cluster pass ``--multihost`` (``jax.distributed.initialize`` detects the
cluster); elsewhere give ``--coordinator_address``, ``--num_processes`` and ``--process_id``.
"""

import json
import logging
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from magjax import train

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


if __name__ == "__main__":
    app.run(main)
