"""The ``quality`` kind: how well the feature norm ranks known quality levels."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from magjax.eval import quality
from magjax.evaluators.base import Evaluator, register


@register
@dataclasses.dataclass
class QualitySet(Evaluator):
    """Images with known quality levels and identities (``path``: an ``.npz`` of ``images``,
    ``quality``, ``labels``; the synthetic data's ``quality.npz``): how well the feature norm
    ranks quality (Spearman), next to how well quality explains recognisability, and the mean
    norm per level."""

    kind = "quality"
    path_options = ("path",)

    path: pathlib.Path
    _arrays: tuple | None = dataclasses.field(default=None, repr=False)

    def prepare(self) -> None:
        """Reads the set once (training evaluates it often)."""
        if self._arrays is None:
            with np.load(self.path) as q:
                self._arrays = q["images"], q["quality"], q["labels"]

    def run(self, encoder) -> dict:
        import scipy.stats

        from magjax.data import synthetic

        self.prepare()
        images, levels, identities = self._arrays
        embeddings, norms = encoder.encode(images)
        return {
            "quality": {
                "spearman_norm_vs_quality": float(scipy.stats.spearmanr(norms, levels).statistic),
                # What the norm's correlation can be compared with (magjax.eval.quality).
                "spearman_recognisability_vs_quality": quality.recognisability_vs_quality(
                    embeddings, identities, levels, clean_level=synthetic.CLEAN
                ),
                "mean_norm_per_level": {
                    int(q): float(norms[levels == q].mean()) for q in np.unique(levels)
                },
            }
        }
