"""The ``ijb`` kind: IJB-B/C 1:1 TAR@FAR of every aggregation mode (:mod:`magjax.eval.ijb`)."""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import numpy as np

from magjax.eval import ijb, quality
from magjax.evaluators.base import Evaluator, register

log = logging.getLogger(__name__)


@register
@dataclasses.dataclass
class IJB(Evaluator):
    """IJB-B or IJB-C 1:1 verification (``root`` holds ``meta/`` and ``loose_crop/``;
    ``target``: ``IJBB`` or ``IJBC``); with an output directory also ``roc_TARGET.png``."""

    kind = "ijb"
    path_options = ("root",)

    root: pathlib.Path
    target: str = "IJBC"
    batch_size: int = 64
    out: pathlib.Path | None = None
    progress: bool = False

    def run(self, encoder) -> dict:
        meta = ijb.load_meta(self.root, self.target)
        log.info(
            "%s: %d images, %d templates, %d pairs",
            self.target,
            meta.names.size,
            np.unique(meta.templates).size,
            meta.labels.size,
        )
        plain, flipped = ijb.extract_features(
            meta, encoder.embed_raw, self.batch_size, self.progress
        )
        results = ijb.evaluate_features(meta, plain, flipped)
        if self.out is not None:
            ijb.plot_roc(results, self.out / f"roc_{self.target.upper()}.png", self.target.upper())
        self.magnitudes[self.target] = quality.magnitudes(plain)
        return {
            "ijb_target": self.target,
            "ijb": {name: {"tar_at_far": r["tar_at_far"]} for name, r in results.items()},
        }
