"""Face clustering evaluation (the MagFace paper, section 4.3).

Embeddings are L2-normalised and clustered with scikit-learn's K-means, agglomerative clustering
(average linkage on cosine distance) and DBSCAN (cosine metric); each partition is scored against
the identity labels with BCubed precision / recall / F-measure (written here: scikit-learn has no
BCubed) and NMI (``sklearn.metrics.normalized_mutual_info_score``).

BCubed (Bagga and Baldwin; Amigo et al. 2009), averaged over items ``i`` with predicted cluster
``C(i)`` and true class ``L(i)``::

    precision = mean_i |C(i) & L(i)| / |C(i)|      recall = mean_i |C(i) & L(i)| / |L(i)|
    F = 2 P R / (P + R)

computed from the sparse cluster x class contingency table ``n`` as ``sum n^2 / |C|``
(resp. ``/ |L|``) over N. DBSCAN's noise points (label -1) are each their own singleton cluster.

Cost: K-means is linear in N; agglomerative clustering holds an N x N distance matrix (fine for
the IJB-B CS1-CS3 sizes, tens of GB beyond ~50k items) and DBSCAN's cosine neighbourhood search
is brute force, O(N^2) time.

IJB-B clustering protocol files (``clustering_protocol/cs{N}.csv``) are read by
:func:`read_protocol`: comma-separated with a header holding at least ``TEMPLATE_ID``,
``SUBJECT_ID`` and ``FILENAME`` (case-insensitive); the other columns (e.g. ``FACE_X``,
``FACE_Y``, ``FACE_WIDTH``, ``FACE_HEIGHT``) are kept as strings.
"""

from __future__ import annotations

import csv
import pathlib

import numpy as np
from sklearn.cluster import DBSCAN, AgglomerativeClustering, KMeans
from sklearn.metrics import normalized_mutual_info_score

METHODS = ("kmeans", "agglomerative", "dbscan")
PROTOCOL_COLUMNS = ("TEMPLATE_ID", "SUBJECT_ID", "FILENAME")


def _dense(labels: np.ndarray) -> np.ndarray:
    """Labels mapped to 0..K-1."""
    return np.unique(np.asarray(labels), return_inverse=True)[1].reshape(-1)


def _with_singleton_noise(pred: np.ndarray) -> np.ndarray:
    """DBSCAN noise (-1) items become singleton clusters with fresh ids."""
    pred = np.asarray(pred).copy()
    noise = pred == -1
    if noise.any():
        start = pred.max() + 1 if (~noise).any() else 0
        pred[noise] = start + np.arange(noise.sum())
    return pred


def bcubed(true_labels: np.ndarray, pred_labels: np.ndarray) -> dict[str, float]:
    """BCubed ``precision``, ``recall`` and ``fmeasure`` of a partition (module doc)."""
    true_labels = np.asarray(true_labels).reshape(-1)
    pred_labels = np.asarray(pred_labels).reshape(-1)
    if true_labels.shape != pred_labels.shape or true_labels.size == 0:
        raise ValueError(
            f"need one predicted label per item: {true_labels.shape} vs {pred_labels.shape}"
        )
    t, p = _dense(true_labels), _dense(pred_labels)
    # Sparse contingency table: counts of each occurring (cluster, class) combination.
    combos, n = np.unique(np.stack([p, t]), axis=1, return_counts=True)
    cluster_size = np.bincount(p)[combos[0]]
    class_size = np.bincount(t)[combos[1]]
    total = float(true_labels.size)
    precision = float(np.sum(n.astype(np.float64) ** 2 / cluster_size) / total)
    recall = float(np.sum(n.astype(np.float64) ** 2 / class_size) / total)
    f = 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "fmeasure": f}


def score_partition(true_labels: np.ndarray, pred_labels: np.ndarray) -> dict[str, float]:
    """BCubed precision/recall/F plus ``nmi`` and ``num_clusters`` (noise as singletons)."""
    pred = _with_singleton_noise(pred_labels)
    result = bcubed(true_labels, pred)
    result["nmi"] = float(normalized_mutual_info_score(true_labels, pred))
    result["num_clusters"] = int(np.unique(pred).size)
    return result


def cluster(
    embeddings: np.ndarray,
    method: str,
    num_clusters: int | None = None,
    eps: float = 0.5,
    min_samples: int = 2,
    seed: int = 0,
) -> np.ndarray:
    """Cluster labels of L2-normalised ``embeddings`` with ``method`` in :data:`METHODS`.

    ``num_clusters`` is needed by kmeans and agglomerative; ``eps`` (cosine distance) and
    ``min_samples`` by DBSCAN (noise = -1).
    """
    x = np.asarray(embeddings, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if method in ("kmeans", "agglomerative"):
        if not num_clusters or num_clusters < 1:
            raise ValueError(f"{method} needs num_clusters >= 1, got {num_clusters}")
        num_clusters = min(num_clusters, x.shape[0])
    if method == "kmeans":
        return KMeans(n_clusters=num_clusters, n_init=10, random_state=seed).fit_predict(x)
    if method == "agglomerative":
        model = AgglomerativeClustering(n_clusters=num_clusters, metric="cosine", linkage="average")
        return model.fit_predict(x)
    if method == "dbscan":
        return DBSCAN(eps=eps, min_samples=min_samples, metric="cosine").fit_predict(x)
    raise ValueError(f"unknown clustering method {method!r}, expected one of {METHODS}")


def evaluate(
    embeddings: np.ndarray,
    labels: np.ndarray,
    methods: tuple[str, ...] = METHODS,
    num_clusters: int | None = None,
    eps: float = 0.5,
    min_samples: int = 2,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Scores of every clustering method; ``num_clusters`` defaults to the number of identities."""
    labels = np.asarray(labels)
    if num_clusters is None:
        num_clusters = int(np.unique(labels).size)
    return {
        m: score_partition(labels, cluster(embeddings, m, num_clusters, eps, min_samples, seed))
        for m in methods
    }


def read_protocol(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Reads an IJB-B clustering protocol CSV; returns its columns keyed by upper-case name.

    ``TEMPLATE_ID`` and ``SUBJECT_ID`` are int64, everything else strings.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip().upper() for h in next(reader)]
        except StopIteration:
            raise ValueError(f"{path}: empty file, expected a header row") from None
        missing = [c for c in PROTOCOL_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"{path}: header lacks columns {missing}; expected at least "
                f"{', '.join(PROTOCOL_COLUMNS)} (got {header})"
            )
        rows = [r for r in reader if any(field.strip() for field in r)]
    columns = {}
    for j, name in enumerate(header):
        values = []
        for number, row in enumerate(rows, 2):
            if j >= len(row):
                raise ValueError(f"{path}:{number}: {len(row)} fields, header has {len(header)}")
            values.append(row[j].strip())
        columns[name] = values
    for name in ("TEMPLATE_ID", "SUBJECT_ID"):
        try:
            columns[name] = np.asarray(columns[name], dtype=np.int64)
        except ValueError as e:
            raise ValueError(f"{path}: column {name} must hold integers: {e}") from e
    return {k: np.asarray(v) if not isinstance(v, np.ndarray) else v for k, v in columns.items()}


def template_embeddings(
    embeddings: np.ndarray, template_ids: np.ndarray, subject_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Averages the unit image embeddings of each protocol template (the items to cluster).

    Returns ``(template_embeddings [T, d] unit, subject_ids [T], template_ids [T] sorted)``; a
    template with images of several subjects is an error.
    """
    x = np.asarray(embeddings, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    uniq, inverse = np.unique(template_ids, return_inverse=True)
    sums = np.zeros((uniq.size, x.shape[1]))
    np.add.at(sums, inverse, x)
    subjects = np.full(uniq.size, -1, np.int64)
    subjects[inverse] = subject_ids
    if np.any(subjects[inverse] != subject_ids):
        raise ValueError("a clustering template holds images of several SUBJECT_IDs")
    return sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12), subjects, uniq
