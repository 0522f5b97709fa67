"""Evaluation of a face encoder, one evaluator per kind, used by training (``config.eval``) and by
``python -m magjax.evaluate``.

Each evaluator is built from where its data is and how to run it, and ``run(encoder) -> dict``
returns its results under its own key; ``encoder`` is a :class:`magjax.encoder.FaceEncoder`.

* :class:`Verification`: 10-fold accuracy of ``.bin`` pair sets, insightface's protocol
  (:mod:`magjax.eval.verification`); with an output directory also each set's error-versus-reject
  curve and mean faces per magnitude bin (:mod:`magjax.eval.quality`);
* :class:`QualitySet`: the feature norm against known quality levels (a synthetic ``.npz``);
* :class:`IJB`: IJB-B/C 1:1 TAR@FAR of every aggregation mode (:mod:`magjax.eval.ijb`);
* :class:`Clustering`: BCubed and NMI of several clusterings (:mod:`magjax.eval.cluster`).

The training loop builds its evaluators with :func:`from_config`.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any

import numpy as np

from magjax.eval import cluster, ijb, quality, verification

log = logging.getLogger(__name__)


def bin_name(path: pathlib.Path) -> str:
    return path.name[: -len(".bin")] if path.name.endswith(".bin") else path.stem


@dataclasses.dataclass
class Verification:
    """``.bin`` verification sets. ``out``: where each set's ERC CSV and mean-face picture go
    (none: numbers only); ``fields``: the summary's fields :meth:`run` keeps (None: all)."""

    paths: list[pathlib.Path]
    batch_size: int = 64
    out: pathlib.Path | None = None
    progress: bool = False
    fields: tuple[str, ...] | None = None
    _loaded: dict = dataclasses.field(default_factory=dict, repr=False)

    def load(self, path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
        """The set's images and labels, read once (training evaluates the same sets often); a
        set the 10-fold protocol cannot run on is refused here, before any embedding."""
        from magjax.data.verification_bin import load_bin, protocol_problem
        from magjax.errors import UserError

        if path not in self._loaded:
            images, issame = load_bin(path)
            problem = protocol_problem(path, issame)
            if problem:
                raise UserError(problem)
            self._loaded[path] = images, issame
        return self._loaded[path]

    def run_set(self, encoder, path: pathlib.Path) -> dict:
        """One set: accuracy ± std, VAL@FAR=1e-3, XNorm, magnitudes and the ERC."""
        name = bin_name(path)
        images, issame = self.load(path)
        plain, flipped = verification.embed_with_flip(
            encoder.embed_raw, images, self.batch_size,
            progress=name if self.progress else None)
        result = verification.evaluate_embedded(plain, flipped, issame)
        mags = quality.magnitudes(plain)
        fused = verification.l2_normalize(plain.astype(np.float64) + flipped)
        scores = np.sum(fused[0::2] * fused[1::2], axis=1)
        pairs = np.stack([np.arange(0, len(images), 2), np.arange(1, len(images), 2)], axis=1)
        curve = quality.error_versus_reject(mags, pairs, scores, issame)
        if self.out is not None:
            quality.write_erc_csv(curve, self.out / f"erc_{name}.csv")
            faces, edges, counts = quality.mean_faces(images, mags)
            quality.plot_mean_faces(faces, edges, counts, self.out / f"mean_faces_{name}.png")
        return {
            "name": name,
            "summary": {
                "accuracy": float(result["accuracy"]),
                "std": float(result["std"]),
                "val": float(result["val"]),
                "val_std": float(result["val_std"]),
                "far": float(result["far"]),
                "xnorm": float(result["xnorm"]),
                "best_thresholds": result["best_thresholds"].tolist(),
                "num_pairs": int(len(issame)),
                "magnitude_mean": float(mags.mean()),
                "magnitude_std": float(mags.std()),
                "erc_fnmr": {f"{r:.2f}": float(f) for r, f in
                             zip(curve["reject_fraction"], curve["fnmr"], strict=True)},
            },
            "curve": curve,
            "magnitudes": mags,
        }

    def run(self, encoder) -> dict:
        results = {}
        for path in self.paths:
            summary = self.run_set(encoder, path)
            results[summary["name"]] = {k: v for k, v in summary["summary"].items()
                                        if self.fields is None or k in self.fields}
        return {"verification": results}


@dataclasses.dataclass
class QualitySet:
    """Images with known quality levels and identities (``.npz``: ``images``, ``quality``,
    ``labels``; the synthetic data's): how well the feature norm ranks quality (Spearman), next
    to how well quality explains recognisability, and the mean norm per level."""

    path: pathlib.Path

    def __post_init__(self):
        with np.load(self.path) as q:
            self.images, self.levels, self.identities = q["images"], q["quality"], q["labels"]

    def run(self, encoder) -> dict:
        import scipy.stats

        from magjax.data import synthetic

        embeddings, norms = encoder.encode(self.images)
        levels = self.levels
        return {"quality": {
            "spearman_norm_vs_quality": float(scipy.stats.spearmanr(norms, levels).statistic),
            # What the norm's correlation can be compared with (magjax.eval.quality).
            "spearman_recognisability_vs_quality": quality.recognisability_vs_quality(
                embeddings, self.identities, levels, clean_level=synthetic.CLEAN),
            "mean_norm_per_level": {int(q): float(norms[levels == q].mean())
                                    for q in np.unique(levels)}}}


@dataclasses.dataclass
class IJB:
    """IJB-B or IJB-C 1:1 verification (``root`` holds ``meta/`` and ``loose_crop/``); with an
    output directory also ``roc_TARGET.png``."""

    root: str
    target: str = "IJBC"
    batch_size: int = 64
    out: pathlib.Path | None = None
    progress: bool = False
    magnitudes: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def run(self, encoder) -> dict:
        meta = ijb.load_meta(self.root, self.target)
        log.info("%s: %d images, %d templates, %d pairs", self.target, meta.names.size,
                 np.unique(meta.templates).size, meta.labels.size)
        plain, flipped = ijb.extract_features(meta, encoder.embed_raw, self.batch_size,
                                              self.progress)
        results = ijb.evaluate_features(meta, plain, flipped)
        if self.out is not None:
            ijb.plot_roc(results, self.out / f"roc_{self.target.upper()}.png",
                         self.target.upper())
        self.magnitudes = quality.magnitudes(plain)
        return {"ijb_target": self.target,
                "ijb": {name: {"tar_at_far": r["tar_at_far"]} for name, r in results.items()}}


@dataclasses.dataclass
class Clustering:
    """Clustering of an image folder ``root/<identity>/<img>`` or of an IJB-B clustering
    protocol CSV (files relative to ``root``, default the CSV's folder; templates are the mean of
    their unit image embeddings)."""

    spec: str
    root: str | None = None
    methods: tuple[str, ...] = cluster.METHODS
    eps: float = 0.5
    min_samples: int = 2
    batch_size: int = 64

    def inputs(self, encoder) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings, labels)`` of the items to cluster."""
        from magjax.data.images import crop_face_box, list_images, read_face

        spec_path = pathlib.Path(self.spec)
        batch = self.batch_size
        if spec_path.is_dir():
            paths = list_images(spec_path)
            labels = np.unique([p.relative_to(spec_path).parts[0] for p in paths],
                               return_inverse=True)[1]
            embs = [encoder.encode(np.stack([read_face(p) for p in paths[i:i + batch]]))[0]
                    for i in range(0, len(paths), batch)]
            return np.concatenate(embs), labels
        columns = cluster.read_protocol(spec_path)
        base = pathlib.Path(self.root) if self.root else spec_path.parent
        files = columns["FILENAME"]
        embs = []
        for i in range(0, len(files), batch):
            images = np.stack([crop_face_box(base / files[j], columns, j)
                               for j in range(i, min(i + batch, len(files)))])
            embs.append(encoder.encode(images)[0])
        feats, subjects, _ = cluster.template_embeddings(
            np.concatenate(embs), columns["TEMPLATE_ID"], columns["SUBJECT_ID"])
        return feats, subjects

    def run(self, encoder) -> dict:
        feats, labels = self.inputs(encoder)
        return {"cluster": cluster.evaluate(feats, labels, self.methods, eps=self.eps,
                                            min_samples=self.min_samples),
                "cluster_items": int(len(labels))}


OFF = ("", "none", "None")  # what switches a set off in config.eval (a CLI gives strings)


def configured_sets(eval_config, data_dir: pathlib.Path) -> tuple[list[pathlib.Path],
                                                                  pathlib.Path | None]:
    """``(verification .bin paths, quality set or None)`` that ``eval_config`` (``config.eval``,
    or its saved JSON) names: the held-out sets the prepared data in ``data_dir`` holds (its
    manifest's, with ``heldout_sets``) and those of ``bins`` and ``quality_set``, relative ones
    resolved against ``data_dir``. ``--config.eval.bins=a.bin,b.bin`` arrives as one string
    and is split; empty and "none" entries are no set."""
    from magjax.data import builders

    bins = [name.strip() for entry in eval_config["bins"] if entry is not None
            for name in str(entry).split(",") if name.strip() not in OFF]
    quality_set = eval_config["quality_set"] if eval_config["quality_set"] not in OFF else None
    manifest_path = data_dir / builders.MANIFEST
    if eval_config.get("heldout_sets", True) and manifest_path.is_file():
        manifest = builders.read_manifest(manifest_path)
        bins = [*manifest.get("verification_bins", []), *bins]
        quality_set = quality_set or manifest.get("quality_set")
    paths = list(dict.fromkeys(data_dir / name for name in bins))
    return paths, (data_dir / quality_set) if quality_set else None


def from_config(config, data_dir: pathlib.Path) -> list[Any]:
    """The evaluators ``config.eval`` names (:func:`configured_sets`): the ``.bin`` sets (read
    here, so that a missing or corrupt one fails before training) and the quality set;
    training runs them every ``eval.every_steps``."""
    bins, quality_set = configured_sets(config.eval, data_dir)
    evaluators: list[Any] = []
    if bins:
        verifier = Verification(bins, batch_size=config.eval.batch_size,
                                fields=("accuracy", "std", "xnorm"))
        for path in verifier.paths:
            verifier.load(path)
        evaluators.append(verifier)
    if quality_set is not None:
        evaluators.append(QualitySet(quality_set))
    return evaluators
