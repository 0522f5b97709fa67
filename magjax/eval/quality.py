"""Face image quality from the feature magnitude (the MagFace paper, section 4.2).

MagFace trains the magnitude ``||x||`` of the raw embedding to grow with image quality; AdaFace's
feature norm carries the same signal. This module evaluates that signal:

* :func:`error_versus_reject`: the error-versus-reject curve (ERC). Definition used here, for a
  reject fraction ``r``: the ``floor(r * N + 1e-9)`` images of lowest quality are rejected (ties
  broken by image index, stable sort); a pair is kept only if NEITHER of its images is rejected
  (so the pair's quality is the min of its two image qualities, as in MagFace's
  ``eval_quality.py``, but the x axis counts images, not pairs). The decision threshold is the
  one giving FMR = 1e-3 on ALL impostor pairs before any rejection and stays fixed (the ISO/IEC
  29794-1 / Grother-Tabassi ERC, so the curve shows only what rejection removes);
  ``threshold="recomputed"`` re-derives it from the kept impostor pairs at every step, as MagFace's
  script does. Threshold at FMR f over n impostor scores: the ``floor(f*n)``-th largest (0-based)
  impostor score ``t``; a pair is accepted iff ``score > t`` (so at most ``f*n`` impostors pass).
  FNMR = kept genuine pairs with ``score <= t`` / kept genuine pairs (NaN when none is kept).
* plots (matplotlib, Agg) and CSV: ERC curves, magnitude histograms per dataset, and mean faces
  per magnitude bin (the paper's Figure 4).
"""

from __future__ import annotations

import csv
import pathlib

import numpy as np
import scipy.stats

from magjax import files
from magjax.eval import cluster, verification

ERC_FRACTIONS = np.round(np.arange(0.0, 0.951, 0.05), 10)
# Figure sizes in inches at 100 dpi; the PNGs have exactly these sizes times 100 in pixels.
DPI = 100
ERC_FIGSIZE = (8.0, 4.5)
HIST_FIGSIZE = (8.0, 4.5)
MEAN_FACE_PANEL = (1.6, 2.0)


def magnitudes(embeddings: np.ndarray) -> np.ndarray:
    """L2 norm of each raw embedding row: the MagFace quality score (AdaFace: the feature norm)."""
    return np.linalg.norm(np.asarray(embeddings, np.float64), axis=1)


def recognisability_vs_quality(
    embeddings: np.ndarray, identities: np.ndarray, levels: np.ndarray, clean_level: int
) -> float:
    """Spearman correlation between the quality level of degraded images and how recognisable
    they are to the model: each image's cosine to the mean unit embedding of its identity's
    ``clean_level`` images.

    The reference for a magnitude's correlation with quality levels: it says how much the
    recorded levels change what the model sees. Where nuisance (pose, light, expression) rather
    than degradation decides how recognisable an image is, this is low, and so is any quality
    score that follows recognisability, as MagFace's magnitude does. Images at ``clean_level``
    are the reference and not scored; every identity needs at least one.
    """
    unit = verification.l2_normalize(np.asarray(embeddings, np.float64))
    identities, levels = np.asarray(identities), np.asarray(levels)
    clean = levels == clean_level
    missing = np.setdiff1d(identities, identities[clean])
    if missing.size:
        raise ValueError(
            f"identities {missing[:5].tolist()} have no image at quality level "
            f"{clean_level}, the reference"
        )
    reference, _, ids = cluster.template_embeddings(
        unit[clean], identities[clean], identities[clean]
    )
    rows = np.searchsorted(ids, identities[~clean])
    cosine = np.einsum("nd,nd->n", unit[~clean], reference[rows])
    return float(scipy.stats.spearmanr(cosine, levels[~clean]).statistic)


def threshold_at_fmr(impostor_scores: np.ndarray, fmr: float = 1e-3) -> float:
    """Similarity threshold ``t`` with at most ``fmr * n`` impostor scores ``> t`` (module doc)."""
    impostor_scores = np.sort(np.asarray(impostor_scores, np.float64))[::-1]
    if impostor_scores.size == 0:
        raise ValueError("threshold at FMR needs impostor pairs")
    k = int(np.floor(fmr * impostor_scores.size))
    return float(impostor_scores[min(k, impostor_scores.size - 1)])


def error_versus_reject(
    quality: np.ndarray,
    pairs: np.ndarray,
    scores: np.ndarray,
    issame: np.ndarray,
    fractions: np.ndarray = ERC_FRACTIONS,
    fmr: float = 1e-3,
    threshold: str = "fixed",
) -> dict[str, np.ndarray]:
    """FNMR at FMR ``fmr`` as the lowest-quality images are rejected (definition: module doc).

    ``quality`` [N] per image; ``pairs`` [P, 2] image indices; ``scores`` [P] similarities (higher
    = more alike); ``issame`` [P]. Returns arrays over ``fractions``: ``reject_fraction``,
    ``fnmr``, ``threshold``, ``kept_genuine``, ``kept_impostor``.
    """
    if threshold not in ("fixed", "recomputed"):
        raise ValueError(f"threshold must be 'fixed' or 'recomputed', got {threshold!r}")
    quality = np.asarray(quality, np.float64)
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    scores = np.asarray(scores, np.float64)
    issame = np.asarray(issame, bool)
    if not pairs.shape[0] == scores.shape[0] == issame.shape[0]:
        raise ValueError(
            f"{pairs.shape[0]} pairs, {scores.shape[0]} scores, {issame.shape[0]} labels"
        )
    if pairs.size and (pairs.min() < 0 or pairs.max() >= quality.size):
        raise ValueError(f"pair indices must lie in [0, {quality.size})")
    # rank[i] = position of image i in ascending quality order; image i is rejected at fraction r
    # iff rank[i] < floor(r * N). A pair survives iff its lower rank survives.
    rank = np.empty(quality.size, np.int64)
    rank[np.argsort(quality, kind="stable")] = np.arange(quality.size)
    pair_rank = np.minimum(rank[pairs[:, 0]], rank[pairs[:, 1]])
    fixed = threshold_at_fmr(scores[~issame], fmr)
    out = {k: [] for k in ("reject_fraction", "fnmr", "threshold", "kept_genuine", "kept_impostor")}
    for fraction in np.asarray(fractions, np.float64):
        rejected = int(np.floor(fraction * quality.size + 1e-9))
        kept = pair_rank >= rejected
        genuine = scores[kept & issame]
        impostor = scores[kept & ~issame]
        if threshold == "fixed":
            t = fixed
        else:
            t = threshold_at_fmr(impostor, fmr) if impostor.size else np.nan
        fnmr = np.mean(genuine <= t) if genuine.size and np.isfinite(t) else np.nan
        for key, value in (
            ("reject_fraction", fraction),
            ("fnmr", fnmr),
            ("threshold", t),
            ("kept_genuine", genuine.size),
            ("kept_impostor", impostor.size),
        ):
            out[key].append(value)
    return {k: np.asarray(v) for k, v in out.items()}


def write_erc_csv(curve: dict[str, np.ndarray], path: str | pathlib.Path) -> None:
    """One row per reject fraction, columns as the keys of :func:`error_versus_reject`."""
    keys = ("reject_fraction", "fnmr", "threshold", "kept_genuine", "kept_impostor")

    def write(f) -> None:
        writer = csv.writer(f)
        writer.writerow(keys)
        for row in zip(*(curve[k] for k in keys), strict=True):
            writer.writerow(
                [repr(float(v)) if isinstance(v, float | np.floating) else int(v) for v in row]
            )

    files.write_stream_atomically(path, write, newline="")


def _figure(figsize):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=figsize, dpi=DPI)


def plot_erc(
    curves: dict[str, dict[str, np.ndarray]], path: str | pathlib.Path, fmr: float = 1e-3
) -> None:
    """ERC plot: FNMR at FMR ``fmr`` (y) against the percentage of images rejected (x).

    One line per entry of ``curves`` (name -> :func:`error_versus_reject` output). A quality
    score that ranks images well gives a curve falling steeply from its value at 0%.
    """
    plt, fig = _figure(ERC_FIGSIZE)
    ax = fig.add_subplot(1, 1, 1)
    for name, curve in curves.items():
        ax.plot(100 * curve["reject_fraction"], curve["fnmr"], marker="o", markersize=3, label=name)
    ax.set_xlabel("lowest-quality images rejected [%]")
    ax.set_ylabel(f"FNMR at FMR={fmr:g}")
    ax.set_title("Error versus reject (quality = feature magnitude)")
    ax.grid(linestyle="--", linewidth=0.5)
    if curves:
        ax.legend(loc="upper right")
    files.save_figure_atomically(fig, path, dpi=DPI)
    plt.close(fig)


def plot_magnitude_histograms(
    values: dict[str, np.ndarray], path: str | pathlib.Path, bins: int = 50
) -> None:
    """Overlaid density histograms of the feature magnitudes, one per dataset."""
    plt, fig = _figure(HIST_FIGSIZE)
    ax = fig.add_subplot(1, 1, 1)
    finite = [np.asarray(v, np.float64) for v in values.values() if len(v)]
    if finite:
        lo = min(float(v.min()) for v in finite)
        hi = max(float(v.max()) for v in finite)
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        for name, v in values.items():
            ax.hist(
                np.asarray(v, np.float64),
                bins=edges,
                density=True,
                alpha=0.5,
                histtype="stepfilled",
                label=f"{name} (mean {np.mean(v):.2f})",
            )
        ax.legend(loc="upper right")
    ax.set_xlabel("feature magnitude ||x||")
    ax.set_ylabel("density")
    ax.set_title("Feature magnitude per dataset")
    files.save_figure_atomically(fig, path, dpi=DPI)
    plt.close(fig)


def mean_faces(
    images: np.ndarray, quality: np.ndarray, num_bins: int = 8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-wise mean image of each magnitude bin (the MagFace paper's Figure 4).

    Bins are equal-width between the 1st and 99th magnitude percentiles (the outer bins also
    take the tails), so a bin's mean face shows what typical images of that magnitude look like.
    Returns ``(faces [B, H, W, C] uint8, edges [B + 1], counts [B])``; an empty bin is black.
    """
    images = np.asarray(images)
    quality = np.asarray(quality, np.float64)
    if images.shape[0] != quality.shape[0] or images.ndim != 4:
        raise ValueError(f"images {images.shape} must be [N, H, W, C] with N = {quality.shape[0]}")
    lo, hi = np.percentile(quality, [1, 99])
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, num_bins + 1)
    which = np.clip(np.searchsorted(edges, quality, side="right") - 1, 0, num_bins - 1)
    faces = np.zeros((num_bins,) + images.shape[1:], np.uint8)
    counts = np.bincount(which, minlength=num_bins)
    for b in range(num_bins):
        if counts[b]:
            faces[b] = np.rint(images[which == b].astype(np.float64).mean(0)).astype(np.uint8)
    return faces, edges, counts


def plot_mean_faces(
    faces: np.ndarray, edges: np.ndarray, counts: np.ndarray, path: str | pathlib.Path
) -> None:
    """One panel per magnitude bin: its mean face, titled with the magnitude range and count.

    The PNG is ``B * 160`` x ``200`` pixels for ``B`` bins.
    """
    num_bins = faces.shape[0]
    plt, fig = _figure((MEAN_FACE_PANEL[0] * num_bins, MEAN_FACE_PANEL[1]))
    for b in range(num_bins):
        ax = fig.add_subplot(1, num_bins, b + 1)
        ax.imshow(faces[b].squeeze(), cmap="gray" if faces.shape[-1] == 1 else None)
        # the outer bins also hold the tails beyond the 1st / 99th percentile
        lo = "" if b == 0 else f"{edges[b]:.1f}"
        hi = "" if b == num_bins - 1 else f"{edges[b + 1]:.1f}"
        label = f"< {hi}" if not lo else (f">= {lo}" if not hi else f"[{lo}, {hi})")
        ax.set_title(f"{label}\nn={counts[b]}", fontsize=8)
        ax.axis("off")
    fig.suptitle("Mean face per magnitude bin (low -> high)", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.72, wspace=0.08)
    files.save_figure_atomically(fig, path, dpi=DPI)
    plt.close(fig)
