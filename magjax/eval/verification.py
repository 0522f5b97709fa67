"""10-fold pair verification (LFW, CFP-FP, AgeDB-30, ... ``.bin`` sets), as insightface computes it.

The protocol is that of insightface ``arcface_torch/eval/verification.py`` (itself from facenet),
reimplemented from its specification (docs/field.md 3c and the description of
tests/fixtures/eval_refs.json) and vectorised: the official code loops over 400 + 4000
thresholds per fold, here every threshold of a fold is answered at once by ``np.searchsorted``
on sorted distances.

* distance = squared Euclidean distance ``sum((e1 - e2)**2)`` (2 - 2cos for unit vectors); a pair is
  predicted "same" iff ``distance < threshold`` (strict);
* folds: ``nrof_folds`` contiguous blocks of pair indices (sklearn ``KFold(shuffle=False)``: the
  first ``N % k`` folds are one pair larger);
* accuracy: per fold, the threshold of ``np.arange(0, 4, 0.01)`` that maximises the accuracy on the
  other folds (first maximum on ties) is applied to the held-out fold; mean and population std
  over folds are reported, with the per-fold thresholds and the test-fold TPR/FPR averaged over
  folds at every grid threshold (0 for a fold without positives/negatives);
* VAL@FAR=1e-3: per fold, the training-fold FAR is computed on ``np.arange(0, 4, 0.001)`` and the
  threshold reaching FAR 1e-3 is interpolated as scipy <= 1.8.1 ``interp1d(far, thr,
  kind="slinear")`` did on these non-decreasing, duplicate-laden FAR values (a current scipy
  refuses them, insightface #2152); threshold 0 when the FAR never reaches the target.

``run`` adds the image side: flip fusion ``emb(img) + emb(flip)``, L2 normalisation and XNorm.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
FAR_TARGET = 1e-3


def fold_bounds(num_pairs: int, nrof_folds: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each contiguous fold, as sklearn ``KFold(n_splits, shuffle=False)``."""
    if nrof_folds < 2:
        raise ValueError(f"nrof_folds must be >= 2, got {nrof_folds}")
    if num_pairs < nrof_folds:
        raise ValueError(f"{num_pairs} pairs cannot be split into {nrof_folds} folds")
    sizes = np.full(nrof_folds, num_pairs // nrof_folds)
    sizes[: num_pairs % nrof_folds] += 1
    stops = np.cumsum(sizes)
    return [(int(stop - size), int(stop)) for size, stop in zip(sizes, stops, strict=True)]


def squared_distances(embeddings1: np.ndarray, embeddings2: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance per pair, computed in the embeddings' dtype, returned as float64.

    float32 -> float64 is exact, so comparing the result with float64 thresholds gives the same
    decisions as numpy's mixed-precision comparison in the official code.
    """
    embeddings1 = np.asarray(embeddings1)
    embeddings2 = np.asarray(embeddings2)
    if embeddings1.shape != embeddings2.shape or embeddings1.ndim != 2:
        raise ValueError(
            f"embeddings1 {embeddings1.shape} and embeddings2 {embeddings2.shape} must both be "
            "[P, d]"
        )
    return np.sum(np.square(embeddings1 - embeddings2), axis=1).astype(np.float64)


def _counts_below(dist: np.ndarray, issame: np.ndarray, bounds, thresholds: np.ndarray):
    """Per fold and threshold: (#positives, #negatives) with ``dist < threshold``, plus fold sizes.

    Returns ``pos_below [F, T]``, ``neg_below [F, T]``, ``n_pos [F]``, ``n_neg [F]`` (int64).
    """
    pos_below, neg_below, n_pos, n_neg = [], [], [], []
    for start, stop in bounds:
        d, s = dist[start:stop], issame[start:stop]
        pos, neg = np.sort(d[s]), np.sort(d[~s])
        # side="left": the number of sorted values strictly below each threshold.
        pos_below.append(np.searchsorted(pos, thresholds, side="left"))
        neg_below.append(np.searchsorted(neg, thresholds, side="left"))
        n_pos.append(pos.size)
        n_neg.append(neg.size)
    return (
        np.asarray(pos_below, np.int64),
        np.asarray(neg_below, np.int64),
        np.asarray(n_pos, np.int64),
        np.asarray(n_neg, np.int64),
    )


def _rate(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator`` with 0 where the denominator is 0 (the official tpr/fpr rule)."""
    numerator = np.asarray(numerator, np.float64)
    denominator = np.broadcast_to(np.asarray(denominator, np.float64), numerator.shape)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def interp_threshold(far: np.ndarray, thresholds: np.ndarray, target: float = FAR_TARGET) -> float:
    """The threshold at which a non-decreasing FAR curve reaches ``target``.

    Reproduces scipy <= 1.8.1 ``interp1d(far, thresholds, kind="slinear")(target)``: the x values
    are stable-sorted and evaluated as a degree-1 B-spline whose knots repeat where FAR values
    repeat, i.e. linear interpolation between the LAST grid point with ``far <= target`` and the
    next one (the edge case ``target == max(far)`` follows scipy too, see below). Written by hand
    because a current scipy rejects duplicated x values.
    """
    far = np.asarray(far, np.float64)
    thresholds = np.asarray(thresholds, np.float64)
    order = np.argsort(far, kind="mergesort")
    far, thresholds = far[order], thresholds[order]
    if not far[0] <= target <= far[-1]:
        raise ValueError(
            f"FAR target {target} outside the interpolation range [{far[0]}, {far[-1]}]"
        )
    last = int(np.searchsorted(far, target, side="right")) - 1
    if last == far.size - 1:
        # target == max FAR. scipy's interval search then stops on the last knot interval
        # [far[-2], far[-1]]: the last threshold, or 0.0 when that interval is degenerate (the
        # maximum repeats), where the de Boor recursion zeroes every basis function.
        if far.size >= 2 and far[-2] == far[-1]:
            return 0.0
        return float(thresholds[-1])
    x0, x1 = far[last], far[last + 1]
    y0, y1 = thresholds[last], thresholds[last + 1]
    # The degree-1 de Boor recursion in scipy's operation order (bit-identical results).
    w = 1.0 / (x1 - x0)
    return float(y0 * (w * (x1 - target)) + y1 * (w * (target - x0)))


def evaluate(
    embeddings1: np.ndarray,
    embeddings2: np.ndarray,
    issame: np.ndarray,
    nrof_folds: int = 10,
) -> dict:
    """10-fold verification of pairs ``(embeddings1[i], embeddings2[i])`` (not normalised here).

    Returns a dict: ``accuracy`` and ``std`` (mean / population std of the fold accuracies),
    ``accuracies`` [F], ``best_thresholds`` [F], ``tpr``/``fpr`` [400] (mean test-fold rates per
    grid threshold), ``val``, ``val_std``, ``far`` (VAL and FAR at FAR target 1e-3) and
    ``val_thresholds`` [F].
    """
    issame = np.asarray(issame).astype(bool).reshape(-1)
    dist = squared_distances(embeddings1, embeddings2)
    if dist.shape[0] != issame.shape[0]:
        raise ValueError(f"{dist.shape[0]} embedding pairs but {issame.shape[0]} issame labels")
    bounds = fold_bounds(dist.shape[0], nrof_folds)

    # Accuracy on the 0.01 grid.
    pos_below, neg_below, n_pos, n_neg = _counts_below(dist, issame, bounds, ACCURACY_THRESHOLDS)
    correct = pos_below + (n_neg[:, None] - neg_below)  # true accepts + true rejects, [F, T]
    correct_train = correct.sum(0, keepdims=True) - correct
    # Training accuracy = correct_train / n_train with one n_train per fold: integer argmax is the
    # same first maximum as the official float argmax.
    best = np.argmax(correct_train, axis=1)
    fold_sizes = n_pos + n_neg
    accuracies = correct[np.arange(len(bounds)), best] / fold_sizes.astype(np.float64)
    tpr = np.mean(_rate(pos_below, n_pos[:, None]), axis=0)
    fpr = np.mean(_rate(neg_below, n_neg[:, None]), axis=0)

    # VAL@FAR on the 0.001 grid.
    _, neg_below_v, _, n_neg_v = _counts_below(dist, issame, bounds, VAL_THRESHOLDS)
    neg_train = neg_below_v.sum(0, keepdims=True) - neg_below_v
    n_neg_train = n_neg_v.sum() - n_neg_v
    vals, fars, val_thresholds = [], [], []
    for fold, (start, stop) in enumerate(bounds):
        if n_neg_train[fold] == 0:
            raise ValueError(
                f"fold {fold}: the training folds hold no negative pair, FAR undefined"
            )
        far_train = neg_train[fold] / float(n_neg_train[fold])
        threshold = (
            interp_threshold(far_train, VAL_THRESHOLDS) if far_train.max() >= FAR_TARGET else 0.0
        )
        accept = dist[start:stop] < threshold
        same = issame[start:stop]
        vals.append(_rate(np.sum(accept & same), np.sum(same)))
        fars.append(_rate(np.sum(accept & ~same), np.sum(~same)))
        val_thresholds.append(threshold)
    vals = np.asarray(vals, np.float64)
    fars = np.asarray(fars, np.float64)
    return {
        "accuracy": float(np.mean(accuracies)),
        "std": float(np.std(accuracies)),
        "accuracies": accuracies,
        "best_thresholds": ACCURACY_THRESHOLDS[best],
        "tpr": tpr,
        "fpr": fpr,
        "val": float(np.mean(vals)),
        "val_std": float(np.std(vals)),
        "far": float(np.mean(fars)),
        "val_thresholds": np.asarray(val_thresholds),
    }


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm; zero rows stay zero (sklearn ``normalize`` semantics)."""
    x = np.asarray(x)
    norms = np.sqrt(np.sum(np.square(x), axis=-1, keepdims=True))
    return x / np.where(norms == 0, 1, norms)


def embed_with_flip(
    embed_fn: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    batch_size: int = 64,
    progress: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Embeds ``images`` [N, H, W, 3] uint8 and their horizontal flips in batches (with a
    progress bar labelled ``progress`` if given).

    Returns ``(plain, flipped)``, the raw embeddings of both, each [N, d] numpy.
    """
    from tqdm import tqdm

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3], got {images.shape}")
    plain, flipped = [], []
    starts = range(0, images.shape[0], batch_size)
    for start in tqdm(starts, disable=progress is None, desc=progress, unit="batch"):
        batch = images[start : start + batch_size]
        plain.append(np.asarray(embed_fn(batch)))
        flipped.append(np.asarray(embed_fn(np.ascontiguousarray(batch[:, :, ::-1, :]))))
    return np.concatenate(plain), np.concatenate(flipped)


def run(
    embed_fn: Callable[[np.ndarray], np.ndarray],
    images_uint8: np.ndarray,
    issame: np.ndarray,
    batch_size: int = 64,
    nrof_folds: int = 10,
) -> dict:
    """Full verification of a ``.bin`` set: images ``[2P, H, W, 3]`` (pair i = rows 2i, 2i+1).

    ``embed_fn`` maps uint8 RGB images to raw embeddings. The result of :func:`evaluate` on the
    flip-fused, L2-normalised embeddings, plus ``xnorm``: the mean L2 norm of the raw embeddings
    of all images and all flips (the insightface training callback's magnitude diagnostic).
    """
    issame = np.asarray(issame).astype(bool)
    if images_uint8.shape[0] != 2 * issame.shape[0]:
        raise ValueError(
            f"{images_uint8.shape[0]} images for {issame.shape[0]} pairs: expected 2 per pair"
        )
    plain, flipped = embed_with_flip(embed_fn, images_uint8, batch_size)
    return evaluate_embedded(plain, flipped, issame, nrof_folds)


def evaluate_embedded(
    plain: np.ndarray, flipped: np.ndarray, issame: np.ndarray, nrof_folds: int = 10
) -> dict:
    """:func:`run` after embedding: raw embeddings of the images and of their flips [2P, d]."""
    norms = np.concatenate([np.linalg.norm(plain, axis=1), np.linalg.norm(flipped, axis=1)])
    fused = l2_normalize(np.asarray(plain, np.float64) + np.asarray(flipped, np.float64))
    result = evaluate(fused[0::2], fused[1::2], issame, nrof_folds=nrof_folds)
    result["xnorm"] = float(np.mean(norms))
    return result
