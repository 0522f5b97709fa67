"""A prepared dataset as the reading side sees it: where its TFDS files are, and its manifest.

A prepared dataset root (``python -m magjax.data prepare``, :mod:`magjax.data.builders`) holds
``<builder>/<version>/`` (the TFDS files) and :data:`MANIFEST` (written last: its presence marks
a complete dataset). This module only reads that layout, so that training, evaluation and the
input pipeline find their data without importing the code that writes datasets.
"""

from __future__ import annotations

import json
import os
import pathlib

from magjax.errors import UserError

MANIFEST = "magjax_dataset.json"


def read_manifest(path: pathlib.Path) -> dict:
    """The JSON object of a ``magjax_dataset.json``; a damaged one is an error naming it."""
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path}: damaged dataset manifest, not JSON ({e}); prepare the dataset "
            "again into a new --out"
        ) from None
    if not isinstance(manifest, dict) or "dataset_dir" not in manifest:
        raise UserError(
            f"{path}: damaged dataset manifest (expected an object with "
            "'dataset_dir'); prepare the dataset again into a new --out"
        )
    return manifest


def find_dataset_dir(path: str | os.PathLike) -> pathlib.Path:
    """The TFDS version directory of a prepared dataset, given it or its root."""
    path = pathlib.Path(path)
    if (path / "dataset_info.json").is_file():
        return path
    manifest = path / MANIFEST
    if manifest.is_file():
        return path / read_manifest(manifest)["dataset_dir"]
    found = sorted(path.glob("*/*/dataset_info.json"))
    if len(found) == 1:
        return found[0].parent
    raise FileNotFoundError(
        f"{path}: no prepared dataset (expected {MANIFEST} or <name>/<version>/dataset_info.json;"
        " build one with `python -m magjax.data prepare`)"
    )
