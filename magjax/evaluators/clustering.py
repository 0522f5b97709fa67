"""The ``clustering`` kind: BCubed and NMI of several clusterings (:mod:`magjax.eval.cluster`)."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from magjax.eval import cluster
from magjax.evaluators.base import Evaluator, register


@register
@dataclasses.dataclass
class Clustering(Evaluator):
    """Clustering of an image folder ``spec = root/<identity>/<img>`` or of an IJB-B clustering
    protocol CSV (files relative to ``root``, default the CSV's folder; templates are the mean of
    their unit image embeddings)."""

    kind = "clustering"
    path_options = ("spec", "root")

    spec: pathlib.Path
    root: pathlib.Path | None = None
    methods: tuple[str, ...] = cluster.METHODS
    eps: float = 0.5
    min_samples: int = 2
    batch_size: int = 64

    def files(self) -> list[pathlib.Path]:
        return [pathlib.Path(self.spec)]  # root: the CSV's files are checked as they are read

    def inputs(self, encoder) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings, labels)`` of the items to cluster."""
        from magjax.data.images import crop_face_box, list_images, read_face

        spec_path = pathlib.Path(self.spec)
        batch = self.batch_size
        if spec_path.is_dir():
            paths = list_images(spec_path)
            labels = np.unique(
                [p.relative_to(spec_path).parts[0] for p in paths], return_inverse=True
            )[1]
            embs = [
                encoder.encode(np.stack([read_face(p) for p in paths[i : i + batch]]))[0]
                for i in range(0, len(paths), batch)
            ]
            return np.concatenate(embs), labels
        columns = cluster.read_protocol(spec_path)
        base = pathlib.Path(self.root) if self.root else spec_path.parent
        files = columns["FILENAME"]
        embs = []
        for i in range(0, len(files), batch):
            images = np.stack(
                [
                    crop_face_box(base / files[j], columns, j)
                    for j in range(i, min(i + batch, len(files)))
                ]
            )
            embs.append(encoder.encode(images)[0])
        feats, subjects, _ = cluster.template_embeddings(
            np.concatenate(embs), columns["TEMPLATE_ID"], columns["SUBJECT_ID"]
        )
        return feats, subjects

    def run(self, encoder) -> dict:
        feats, labels = self.inputs(encoder)
        return {
            "cluster": cluster.evaluate(
                feats, labels, self.methods, eps=self.eps, min_samples=self.min_samples
            ),
            "cluster_items": int(len(labels)),
        }
