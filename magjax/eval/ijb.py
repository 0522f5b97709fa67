"""IJB-B / IJB-C 1:1 template verification (TAR at FAR 1e-6 ... 1e-1).

Layout read (the insightface repack, docs/field.md 3d)::

    ROOT/loose_crop/<img_name>                       e.g. 1.jpg
    ROOT/meta/<t>_face_tid_mid.txt                   img_name template_id media_id
    ROOT/meta/<t>_name_5pts_score.txt                img_name x1 y1 ... x5 y5 faceness_score
    ROOT/meta/<t>_template_pair_label.txt            template_id1 template_id2 label

with ``<t>`` = ``ijbb`` or ``ijbc``. Images are aligned with their five landmarks
(:mod:`magjax.eval.align`), embedded with and without a horizontal flip, and aggregated into
template features by one of these methods (all compared by cosine similarity):

* ``insightface`` (``eval_ijbc.py``), flags ``use_flip_test`` (F: image feature = emb + emb_flip,
  otherwise emb alone), ``use_norm_score`` (N: keep the raw image feature, whose norm then
  weights it; otherwise L2-normalise it), ``use_detector_score`` (D: multiply by the faceness
  score). Per template, images of the same media are averaged (no normalisation), the media
  features are summed, the sum is L2-normalised. The official defaults are N1 D1 F1.
* ``magface`` (MagFace ``eval_ijb.py``): media = mean of raw image features, L2-normalised;
  template = mean of the media features.
* ``magface_plus`` (MagFace ``eval_ijb.py --magface_qlt 1``, "MagFace+"): as ``magface`` but the
  media features keep their magnitude, so high-magnitude (high-quality) media weigh more.
  (MagFace reports ``1 - arccos(cos)/pi``, a monotone map of the cosine: same ROC.)
* ``adaface`` (AdaFace ``validate_IJB_BC.py``, ``fusion_method="norm_weighted_avg"``): the flip
  pair is fused as the norm-weighted average of the two unit embeddings and re-normalised (the
  norms weigh the two views of an image against each other), then aggregated as
  ``insightface`` on these unit features. AdaFace's default ``pre_norm_vector_add`` equals
  ``insightface`` N1 D0 F1 and is listed under that name.

TAR@FAR is read off the ROC as the official code does: ``sklearn.metrics.roc_curve`` (with its
default ``drop_intermediate=True``), both arrays flipped, and at each target the TPR of the ROC
point whose FPR is nearest (first such point of the flipped arrays on ties).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import warnings
from collections.abc import Callable, Iterable

import numpy as np
from sklearn.metrics import roc_curve

from magjax import files
from magjax.errors import UserError
from magjax.eval.verification import embed_with_flip, l2_normalize

FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
METHODS = ("insightface", "magface", "magface_plus", "adaface")


# ---------------------------------------------------------------------------------------------
# Meta files.


def _lines(path: pathlib.Path) -> list[list[str]]:
    """Non-empty lines of a whitespace-separated text file, split into fields."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    # Undecodable bytes (a binary file) become fields that fail to parse, naming the line.
    with open(path, errors="replace") as f:
        return [line.split() for line in f if line.strip()]


def read_face_tid_mid(path: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``*_face_tid_mid.txt`` -> ``(names [M] str, templates [M] int64, medias [M] int64)``."""
    path = pathlib.Path(path)
    names, templates, medias = [], [], []
    for number, fields in enumerate(_lines(path), 1):
        if len(fields) < 3:
            raise UserError(
                f"{path}:{number}: expected 'img_name template_id media_id', got {fields}"
            )
        try:
            templates.append(int(fields[1]))
            medias.append(int(fields[2]))
        except ValueError as e:
            raise UserError(f"{path}:{number}: template/media ids must be integers: {e}") from e
        names.append(fields[0])
    return np.asarray(names), np.asarray(templates, np.int64), np.asarray(medias, np.int64)


def read_template_pair_label(path: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``*_template_pair_label.txt`` -> ``(t1 [P], t2 [P], labels [P])`` int64.

    Parsed with ``np.fromfile`` (the IJB-C file has 15.7M lines; line-wise Python is slow).
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    with warnings.catch_warnings():
        # Older numpy stops at an unparsable token with only a DeprecationWarning; numpy 2.4
        # raises ValueError. Both become an error naming the file.
        warnings.simplefilter("error", DeprecationWarning)
        try:
            values = np.fromfile(path, dtype=np.float64, sep=" ")
        except (DeprecationWarning, ValueError) as e:
            raise UserError(f"{path}: expected lines 't1 t2 label' of integers: {e}") from e
    _check_three_columns(path, values.size)
    if not np.all(values == np.round(values)):
        raise UserError(
            f"{path}: expected lines 't1 t2 label' of integers ({values.size} numbers read)"
        )
    values = values.astype(np.int64).reshape(-1, 3)
    if not np.isin(values[:, 2], (0, 1)).all():
        raise UserError(f"{path}: labels (3rd column) must be 0 or 1")
    return values[:, 0], values[:, 1], values[:, 2]


def _check_three_columns(path: pathlib.Path, numbers: int) -> None:
    """``np.fromfile`` reads numbers regardless of lines: a file whose lines lack a column
    can still hold a multiple of 3 numbers, which would then be read with template ids in the
    label column. The non-blank lines are counted (in C: blank lines are rare, so the regular
    expression finds few) and, if they do not hold 3 numbers each, the first line that does
    not is named."""
    data = path.read_bytes()
    ends_line = data.endswith(b"\n")
    lines = data.count(b"\n") + (0 if ends_line else 1)
    # With re.M, "^...$" also matches the empty text after a final line break: not a line.
    blank = len(re.findall(rb"^[ \t\r\f\v]*$", data, re.M)) - (1 if ends_line else 0)
    if numbers == 3 * (lines - blank if data else 0):
        return
    for number, line in enumerate(data.splitlines(), 1):
        fields = line.split()
        if fields and len(fields) != 3:
            raise UserError(
                f"{path}:{number}: expected 't1 t2 label', got {len(fields)} "
                f"fields: {line[:80].decode('ascii', 'replace')!r}"
            )
    raise UserError(f"{path}: expected lines 't1 t2 label' of integers ({numbers} numbers)")


def read_name_5pts_score(
    path: str | pathlib.Path,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``*_name_5pts_score.txt`` -> ``(names [M], landmarks [M, 5, 2] float32, faceness [M])``."""
    path = pathlib.Path(path)
    names, landmarks, scores = [], [], []
    for number, fields in enumerate(_lines(path), 1):
        if len(fields) != 12:
            raise UserError(
                f"{path}:{number}: expected 'img_name x1 y1 ... x5 y5 faceness_score' "
                f"(12 fields), got {len(fields)}"
            )
        try:
            values = [float(v) for v in fields[1:]]
        except ValueError as e:
            raise UserError(f"{path}:{number}: landmarks/score must be numbers: {e}") from e
        names.append(fields[0])
        landmarks.append(values[:10])
        scores.append(values[10])
    return (
        np.asarray(names),
        np.asarray(landmarks, np.float32).reshape(-1, 5, 2),
        np.asarray(scores, np.float32),
    )


@dataclasses.dataclass
class IJBMeta:
    """One IJB benchmark's meta data, rows in ``*_face_tid_mid.txt`` order."""

    image_dir: pathlib.Path
    names: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    landmarks: np.ndarray
    faceness: np.ndarray
    pair_t1: np.ndarray
    pair_t2: np.ndarray
    labels: np.ndarray


def load_meta(root: str | pathlib.Path, target: str = "IJBC") -> IJBMeta:
    """Reads the three meta files of ``root`` (``.../IJBC`` or a parent holding ``IJBC/``).

    The landmark rows are matched to the template rows by image name (the official code
    assumes the two files share their order; a name missing from either is an error).
    """
    target = target.upper()
    if target not in ("IJBB", "IJBC"):
        raise ValueError(f"target must be IJBB or IJBC, got {target!r}")
    root = pathlib.Path(root)
    if not (root / "meta").is_dir() and (root / target / "meta").is_dir():
        root = root / target
    meta_dir = root / "meta"
    prefix = target.lower()
    names, templates, medias = read_face_tid_mid(meta_dir / f"{prefix}_face_tid_mid.txt")
    lmk_path = meta_dir / f"{prefix}_name_5pts_score.txt"
    lmk_names, landmarks, faceness = read_name_5pts_score(lmk_path)
    if len(set(lmk_names.tolist())) != lmk_names.size:
        raise UserError(f"{lmk_path}: duplicate image names")
    row_of = {name: i for i, name in enumerate(lmk_names.tolist())}
    missing = [n for n in names.tolist() if n not in row_of]
    if missing:
        raise UserError(
            f"{lmk_path}: no landmarks for {len(missing)} images of {prefix}_face_tid_mid.txt, "
            f"e.g. {missing[:3]}"
        )
    order = np.asarray([row_of[n] for n in names.tolist()], np.int64)
    pairs_path = meta_dir / f"{prefix}_template_pair_label.txt"
    t1, t2, labels = read_template_pair_label(pairs_path)
    if labels.size == 0 or labels.min() == labels.max():
        raise UserError(
            f"{pairs_path}: TAR@FAR needs genuine (label 1) and impostor (label 0) "
            f"pairs; its {labels.size} pairs hold "
            f"{'no' if labels.size == 0 else 'only label ' + str(labels.min())}"
        )
    unknown = np.setdiff1d(np.union1d(t1, t2), templates)
    if unknown.size:
        raise UserError(
            f"{pairs_path} names {unknown.size} templates absent from "
            f"{prefix}_face_tid_mid.txt, e.g. {unknown[:3].tolist()}"
        )
    return IJBMeta(
        image_dir=root / "loose_crop",
        names=names,
        templates=templates,
        medias=medias,
        landmarks=landmarks[order],
        faceness=faceness[order],
        pair_t1=t1,
        pair_t2=t2,
        labels=labels,
    )


# ---------------------------------------------------------------------------------------------
# Images -> features.


def load_aligned(path: pathlib.Path, landmarks: np.ndarray) -> np.ndarray:
    """One loose crop read with Pillow (RGB) and aligned to 112x112 with its landmarks."""
    from magjax.data.images import read_image, to_rgb
    from magjax.eval.align import align_face

    image = np.asarray(to_rgb(read_image(path)))  # errors name the path
    return align_face(image, landmarks)


def iter_aligned(meta: IJBMeta, batch_size: int = 64, workers: int = 4) -> Iterable[np.ndarray]:
    """Yields batches of aligned 112x112 RGB uint8 faces, in ``meta.names`` order.

    JPEG decoding and warping run on ``workers`` threads (both release the GIL for most of
    their work); the order of the images is kept.
    """
    from concurrent.futures import ThreadPoolExecutor

    paths = [meta.image_dir / name for name in meta.names.tolist()]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(paths), batch_size):
            stop = start + batch_size
            yield np.stack(
                list(pool.map(load_aligned, paths[start:stop], meta.landmarks[start:stop]))
            )


def extract_features(
    meta: IJBMeta,
    embed_fn: Callable[[np.ndarray], np.ndarray],
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Raw embeddings of every aligned image and of its flip: ``(plain [M, d], flipped [M, d])``."""
    from tqdm import tqdm

    plain, flipped = [], []
    total = -(-meta.names.size // batch_size)
    for batch in tqdm(
        iter_aligned(meta, batch_size),
        total=total,
        disable=not progress,
        desc="IJB images",
        unit="batch",
    ):
        p, f = embed_with_flip(embed_fn, batch, batch_size)
        plain.append(p)
        flipped.append(f)
    return np.concatenate(plain), np.concatenate(flipped)


# ---------------------------------------------------------------------------------------------
# Aggregation and scores.


def image_features(
    plain: np.ndarray,
    flipped: np.ndarray | None = None,
    faceness: np.ndarray | None = None,
    *,
    method: str = "insightface",
    use_flip_test: bool = True,
    use_norm_score: bool = True,
    use_detector_score: bool = True,
) -> np.ndarray:
    """Per-image features entering template aggregation, for ``method`` (see module doc).

    The N/D flags apply to ``insightface`` only; ``use_flip_test`` applies to every method.
    """
    if method not in METHODS:
        raise ValueError(f"unknown IJB method {method!r}, expected one of {METHODS}")
    if use_flip_test and flipped is None:
        raise ValueError("use_flip_test needs the flipped-image embeddings")
    plain = np.asarray(plain)
    if method == "adaface":
        if not use_flip_test:
            return l2_normalize(plain)
        norms = np.stack([np.linalg.norm(plain, axis=1), np.linalg.norm(flipped, axis=1)])
        weights = norms / norms.sum(0, keepdims=True)
        return l2_normalize(
            weights[0][:, None] * l2_normalize(plain) + weights[1][:, None] * l2_normalize(flipped)
        )
    feats = plain + flipped if use_flip_test else plain
    if method != "insightface":
        return feats
    if not use_norm_score:
        feats = l2_normalize(feats)
    if use_detector_score:
        if faceness is None:
            raise ValueError("use_detector_score needs the faceness scores")
        feats = feats * np.asarray(faceness)[:, None]
    return feats


def template_features(
    feats: np.ndarray,
    templates: np.ndarray,
    medias: np.ndarray,
    method: str = "insightface",
) -> tuple[np.ndarray, np.ndarray]:
    """Aggregates image features into L2-normalised template features.

    Returns ``(template_feats [T, d], unique_templates [T])`` with sorted template ids. A media
    id groups images only within its template. ``insightface`` and ``adaface`` sum the media
    means; ``magface`` normalises each media mean first; ``magface_plus`` keeps the magnitudes.
    Vectorised with one lexsort and ``np.add.reduceat`` instead of per-template loops.
    """
    if method not in METHODS:
        raise ValueError(f"unknown IJB method {method!r}, expected one of {METHODS}")
    feats = np.asarray(feats)
    templates = np.asarray(templates)
    medias = np.asarray(medias)
    if not feats.shape[0] == templates.shape[0] == medias.shape[0]:
        raise ValueError(
            f"{feats.shape[0]} features, {templates.shape[0]} template ids, "
            f"{medias.shape[0]} media ids: one of each per image expected"
        )
    order = np.lexsort((medias, templates))
    t_sorted, m_sorted, f_sorted = templates[order], medias[order], feats[order]
    new_media = np.r_[True, (t_sorted[1:] != t_sorted[:-1]) | (m_sorted[1:] != m_sorted[:-1])]
    media_starts = np.flatnonzero(new_media)
    media_counts = np.diff(np.r_[media_starts, t_sorted.size])
    media_feats = np.add.reduceat(f_sorted, media_starts, axis=0) / media_counts[:, None]
    if method == "magface":
        media_feats = l2_normalize(media_feats)
    media_templates = t_sorted[media_starts]
    new_template = np.r_[True, media_templates[1:] != media_templates[:-1]]
    template_starts = np.flatnonzero(new_template)
    template_feats = np.add.reduceat(media_feats, template_starts, axis=0)
    # magface* average over media rather than summing: a positive factor, removed by the
    # normalisation below, so it is not applied.
    return l2_normalize(template_feats), media_templates[template_starts]


def pair_scores(
    template_feats: np.ndarray,
    unique_templates: np.ndarray,
    t1: np.ndarray,
    t2: np.ndarray,
    batch_size: int = 20_000,
) -> np.ndarray:
    """Cosine similarity of each template pair (``template_feats`` are unit rows).

    Batched so that the gathered rows stay small (IJB-C has 15.7M pairs).
    """
    i1 = np.searchsorted(unique_templates, t1)
    i2 = np.searchsorted(unique_templates, t2)
    for ids, idx in ((t1, i1), (t2, i2)):
        bad = (idx >= unique_templates.size) | (
            unique_templates[np.minimum(idx, unique_templates.size - 1)] != ids
        )
        if bad.any():
            raise ValueError(f"pairs name unknown template ids, e.g. {np.asarray(ids)[bad][:3]}")
    scores = np.empty(len(t1), dtype=template_feats.dtype)
    for start in range(0, len(t1), batch_size):
        a = template_feats[i1[start : start + batch_size]]
        b = template_feats[i2[start : start + batch_size]]
        scores[start : start + batch_size] = np.einsum("ij,ij->i", a, b)
    return scores


def tar_at_far(
    labels: np.ndarray, scores: np.ndarray, far_targets: Iterable[float] = FAR_TARGETS
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """TAR at each FAR target, read off the ROC as insightface ``eval_ijbc.py`` does.

    Returns ``({repr(far): tar}, fpr, tpr)``, the ROC arrays flipped (descending FPR).
    """
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        raise ValueError("TAR@FAR needs both genuine (1) and impostor (0) pairs")
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    # np.argmin returns the first minimum: the official min over (|fpr - x|, index) tuples.
    result = {repr(x): float(tpr[int(np.argmin(np.abs(fpr - x)))]) for x in far_targets}
    return result, fpr, tpr


def evaluate_features(
    meta: IJBMeta,
    plain: np.ndarray,
    flipped: np.ndarray | None,
    modes: dict[str, dict] | None = None,
) -> dict[str, dict]:
    """TAR@FAR for several aggregation modes from the same image embeddings.

    ``modes`` maps a display name to :func:`image_features` keyword arguments; by default the
    official insightface N1D1F1 and N0D1F1, MagFace, MagFace+ and AdaFace. Each result holds
    ``tar_at_far``, and ``fpr``/``tpr`` (the flipped ROC) for plotting.
    """
    if modes is None:
        modes = default_modes()
    results = {}
    for name, kwargs in modes.items():
        kwargs = dict(kwargs)
        method = kwargs.get("method", "insightface")
        feats = image_features(plain, flipped, meta.faceness, **kwargs)
        tfeats, uniq = template_features(feats, meta.templates, meta.medias, method)
        scores = pair_scores(tfeats, uniq, meta.pair_t1, meta.pair_t2)
        tars, fpr, tpr = tar_at_far(meta.labels, scores)
        results[name] = {"tar_at_far": tars, "fpr": fpr, "tpr": tpr, **kwargs}
    return results


def default_modes() -> dict[str, dict]:
    """The aggregation modes reported by ``python -m magjax.evaluate --ijb``."""
    return {
        "insightface_N1D1F1": dict(
            method="insightface", use_norm_score=True, use_detector_score=True, use_flip_test=True
        ),
        "insightface_N0D1F1": dict(
            method="insightface", use_norm_score=False, use_detector_score=True, use_flip_test=True
        ),
        "insightface_N1D0F1": dict(
            method="insightface", use_norm_score=True, use_detector_score=False, use_flip_test=True
        ),
        "magface_F1": dict(method="magface", use_flip_test=True),
        "magface_plus_F1": dict(method="magface_plus", use_flip_test=True),
        "adaface_F1": dict(method="adaface", use_flip_test=True),
    }


def plot_roc(results: dict, path: pathlib.Path, title: str) -> None:
    """ROC (TAR against log FAR, 1e-6 ... 1) of each IJB aggregation mode, 800x450 pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(8.0, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for name, r in results.items():
        keep = r["fpr"] > 0
        ax.plot(r["fpr"][keep], r["tpr"][keep], lw=1, label=name)
    ax.set_xscale("log")
    ax.set_xlim(1e-6, 1.0)
    ax.set_xlabel("False accept rate (FAR)")
    ax.set_ylabel("True accept rate (TAR)")
    ax.set_title(f"ROC on {title} 1:1")
    ax.grid(linestyle="--", linewidth=0.5)
    ax.legend(loc="lower right", fontsize=8)
    files.save_figure_atomically(fig, path, dpi=100)
    plt.close(fig)
