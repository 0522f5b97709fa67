"""Checks one case of a ``magjax-eval-refs/1`` file against magjax's evaluation code.

Used by ``python -m magjax.refcheck FILE``. Case kinds (their exact protocol is the file's
``description``):

* ``verification``: ``embeddings1``, ``embeddings2`` ([P, d], the flip-fused unit embeddings of
  the two sides of each pair), ``issame`` [P], ``nrof_folds``; expected ``accuracy_mean``,
  ``accuracy_std``, ``best_thresholds``, ``tpr``, ``fpr``, ``val``, ``val_std``, ``far``.
* ``ijb``: ``features`` ([M, d] image features, or [M, 2d] = [plain | flipped] when
  ``use_flip_test`` is true), ``faceness_scores``, ``templates``, ``medias``, ``pairs`` [P, 2],
  ``labels``, flags ``use_norm_score``, ``use_detector_score``, ``use_flip_test``; expected
  ``scores`` [P] and ``tar_at_far`` ({repr(far): tar}).

Pass rule: fields that are ratios of counts (accuracies, thresholds picked from the grid, TPR,
FPR, VAL, FAR, TAR) must match exactly (|error| <= 1e-12) in either dtype: a wrong count would
show; float fields (``accuracy_std``, ``val_std``, ``scores``) within
``tol * max(1, max|expected|)`` with ``magjax.refcheck.TOLERANCE``.
"""

from __future__ import annotations

import numpy as np

from magjax.eval import ijb, verification
from magjax.refcheck import TOLERANCE, field_error, within_tolerance

EXACT = 1e-12

# (expected key, result key, exact?)
_VERIFICATION_FIELDS = (
    ("accuracy_mean", "accuracy", True),
    ("accuracy_std", "std", False),
    ("best_thresholds", "best_thresholds", True),
    ("tpr", "tpr", True),
    ("fpr", "fpr", True),
    ("val", "val", True),
    ("val_std", "val_std", False),
    ("far", "far", True),
)


def _dtype(dtype: str) -> type:
    if dtype not in TOLERANCE:
        raise ValueError(f"dtype must be one of {sorted(TOLERANCE)}, got {dtype!r}")
    return np.float64 if dtype == "float64" else np.float32


def _field(case: dict, key: str, where: str = "") -> object:
    container = case["expected"] if where == "expected" else case
    if key not in container:
        raise KeyError(
            f"case {case.get('name', '?')!r}: missing {'expected.' if where else ''}{key!r}"
        )
    return container[key]


def _compare(name: str, got, expected, exact: bool, dtype: str) -> tuple[bool, str]:
    try:
        error, scale = field_error(got, expected)
    except ValueError as mismatch:
        return False, f"{name} {mismatch}"
    ok = error <= EXACT if exact else within_tolerance(error, scale, dtype)
    return ok, f"{name} {error:.1e}"


def check_verification(case: dict, dtype: str = "float64") -> tuple[bool, str]:
    """Runs :func:`magjax.eval.verification.evaluate` on a ``verification`` case."""
    float_type = _dtype(dtype)
    e1 = np.asarray(_field(case, "embeddings1"), np.float64).astype(float_type)
    e2 = np.asarray(_field(case, "embeddings2"), np.float64).astype(float_type)
    issame = np.asarray(_field(case, "issame"), bool)
    result = verification.evaluate(e1, e2, issame, nrof_folds=int(case.get("nrof_folds", 10)))
    return _report(case, result, _VERIFICATION_FIELDS, dtype)


def check_ijb(case: dict, dtype: str = "float64") -> tuple[bool, str]:
    """Runs the insightface-mode IJB aggregation, scoring and TAR@FAR on an ``ijb`` case."""
    float_type = _dtype(dtype)
    features = np.asarray(_field(case, "features"), np.float64).astype(float_type)
    faceness = np.asarray(_field(case, "faceness_scores"), np.float64).astype(float_type)
    use_flip = bool(case.get("use_flip_test", False))
    plain, flipped = features, None
    if use_flip:
        if features.shape[1] % 2:
            raise ValueError(
                f"case {case.get('name')!r}: use_flip_test needs features [M, 2d] = "
                f"[plain | flipped], got width {features.shape[1]}"
            )
        half = features.shape[1] // 2
        plain, flipped = features[:, :half], features[:, half:]
    feats = ijb.image_features(
        plain,
        flipped,
        faceness,
        method="insightface",
        use_flip_test=use_flip,
        use_norm_score=bool(_field(case, "use_norm_score")),
        use_detector_score=bool(_field(case, "use_detector_score")),
    )
    tfeats, uniq = ijb.template_features(
        feats, np.asarray(_field(case, "templates")), np.asarray(_field(case, "medias"))
    )
    pairs = np.asarray(_field(case, "pairs"), np.int64).reshape(-1, 2)
    scores = ijb.pair_scores(tfeats, uniq, pairs[:, 0], pairs[:, 1])
    expected_tar = _field(case, "tar_at_far", "expected")
    targets = [float(k) for k in expected_tar]
    tars, _, _ = ijb.tar_at_far(np.asarray(_field(case, "labels")), scores, targets)
    result = {"scores": scores}
    result.update({f"tar@{k}": tars[repr(float(k))] for k in expected_tar})
    expected = {"scores": _field(case, "scores", "expected")}
    expected.update({f"tar@{k}": v for k, v in expected_tar.items()})
    fields = [("scores", "scores", False)] + [(f"tar@{k}", f"tar@{k}", True) for k in expected_tar]
    return _report({"expected": expected}, result, fields, dtype)


def _report(case: dict, result: dict, fields, dtype: str) -> tuple[bool, str]:
    passed, parts = True, []
    for expected_key, result_key, exact in fields:
        ok, text = _compare(
            expected_key, result[result_key], case["expected"][expected_key], exact, dtype
        )
        passed &= ok
        parts.append(text if ok else f"{text} FAIL")
    return passed, " ".join(parts)


def check_case(case: dict, dtype: str = "float64") -> tuple[bool, str]:
    """Checks one ``magjax-eval-refs/1`` case; returns ``(passed, one-line detail)``."""
    kind = case.get("kind")
    if kind == "verification":
        return check_verification(case, dtype)
    if kind == "ijb":
        return check_ijb(case, dtype)
    raise ValueError(
        f"case {case.get('name', '?')!r}: unknown kind {kind!r}, expected 'verification' or 'ijb'"
    )
