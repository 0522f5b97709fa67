"""Face data for magjax: readers, TFDS builders, the grain input pipeline, verification sets.

* ``recordio``: insightface MXNet RecordIO reader and writer (no mxnet needed).
* ``verification_bin``: safe reader / writer of insightface verification ``.bin`` files.
* ``synthetic``: procedural synthetic identities with quality levels (demo and tests).
* ``builders``: TFDS (array_record) builders for RecordIO, image folders and synthetic data;
  ``prepare`` and ``inspect_dataset``.
* ``prepared``: the reading side of a prepared dataset (its manifest, its TFDS directory),
  which training and evaluation use without importing the builders.
* ``pipeline``: ``TrainPipeline``, endless host-local batches with a checkpointable state.

Command line: ``python -m magjax.data prepare|inspect`` (see ``magjax/data/__main__.py``).
"""

from __future__ import annotations

import os
import pathlib

# The side of an aligned face crop (insightface's 112 x 112 template): what every reader delivers
# and every backbone takes (magjax.models.INPUT_SHAPE).
FACE_SIZE = 112


def prepare(
    format: str, src: str | os.PathLike | None, out: str | os.PathLike, **options
) -> pathlib.Path:
    """Builds (or finds, if already complete) a TFDS dataset; see builders.prepare."""
    from magjax.data import builders  # tensorflow_datasets is imported only when needed

    return builders.prepare(format, src, out, **options)


__all__ = ["FACE_SIZE", "prepare"]
