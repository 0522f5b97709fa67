"""Clustering evaluation: BCubed on hand-computed examples and against a slow per-item loop,
NMI, the three sklearn methods on separable data, and the IJB-B protocol reader."""

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from magjax.eval import cluster


def slow_bcubed(true, pred):
    """Per-item definition, O(N^2)."""
    true, pred = np.asarray(true), np.asarray(pred)
    p = r = 0.0
    for i in range(true.size):
        same_cluster = pred == pred[i]
        same_class = true == true[i]
        both = np.sum(same_cluster & same_class)
        p += both / same_cluster.sum()
        r += both / same_class.sum()
    p, r = p / true.size, r / true.size
    return p, r, 2 * p * r / (p + r)


def test_bcubed_hand_computed():
    # classes A A A B B, clusters {0,1} {2,3,4}
    # precision per item: 1, 1, 1/3, 2/3, 2/3 -> 11/15; recall: 2/3, 2/3, 1/3, 1, 1 -> 11/15
    got = cluster.bcubed(["A", "A", "A", "B", "B"], [0, 0, 1, 1, 1])
    assert got["precision"] == pytest.approx(11 / 15)
    assert got["recall"] == pytest.approx(11 / 15)
    assert got["fmeasure"] == pytest.approx(11 / 15)
    # all singletons: precision 1, recall = mean 1/|class| = (3 * 1/3 + 2 * 1/2) / 5 = 2/5
    got = cluster.bcubed([0, 0, 0, 1, 1], [0, 1, 2, 3, 4])
    assert (got["precision"], got["recall"]) == (pytest.approx(1.0), pytest.approx(0.4))
    assert got["fmeasure"] == pytest.approx(2 * 0.4 / 1.4)
    # one big cluster: recall 1, precision = (3 * 3/5 + 2 * 2/5) / 5 = 13/25
    got = cluster.bcubed([0, 0, 0, 1, 1], [7] * 5)
    assert (got["precision"], got["recall"]) == (pytest.approx(13 / 25), pytest.approx(1.0))


def test_bcubed_against_slow_loop():
    rng = np.random.default_rng(0)
    for _ in range(5):
        true = rng.integers(0, 7, 200)
        pred = rng.integers(-1, 9, 200) * 3  # arbitrary label values
        got = cluster.bcubed(true, pred)
        p, r, f = slow_bcubed(true, pred)
        assert got["precision"] == pytest.approx(p, abs=1e-12)
        assert got["recall"] == pytest.approx(r, abs=1e-12)
        assert got["fmeasure"] == pytest.approx(f, abs=1e-12)


def test_dbscan_noise_counts_as_singletons():
    scores = cluster.score_partition([0, 0, 1, 1], [-1, -1, 0, 0])
    p, r, f = slow_bcubed([0, 0, 1, 1], [10, 11, 0, 0])
    assert scores["precision"] == pytest.approx(p) and scores["recall"] == pytest.approx(r)
    assert scores["num_clusters"] == 3
    nmi = normalized_mutual_info_score([0, 0, 1, 1], [10, 11, 0, 0])
    assert scores["nmi"] == pytest.approx(nmi)


def test_methods_on_separable_embeddings():
    rng = np.random.default_rng(1)
    centres = np.eye(16)[:6] * 5
    labels = np.repeat(np.arange(6), 15)
    emb = centres[labels] + 0.3 * rng.normal(size=(labels.size, 16))
    emb *= rng.uniform(1, 20, (labels.size, 1))  # magnitudes must not matter
    results = cluster.evaluate(emb, labels, eps=0.3, min_samples=3)
    for method in cluster.METHODS:
        assert results[method]["fmeasure"] == pytest.approx(1.0), method
        assert results[method]["nmi"] == pytest.approx(1.0), method
        assert results[method]["num_clusters"] == 6
    # too few clusters: recall stays 1, precision drops
    merged = cluster.score_partition(labels, cluster.cluster(emb, "kmeans", 3))
    assert merged["recall"] == pytest.approx(1.0) and merged["precision"] < 0.6
    with pytest.raises(ValueError, match="unknown clustering method"):
        cluster.cluster(emb, "spectral", 3)


def test_protocol_reader(tmp_path):
    path = tmp_path / "cs1.csv"
    path.write_text(
        "TEMPLATE_ID,SUBJECT_ID,FILENAME,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT\n"
        "1,10,img/1.jpg,5,6,50,60\n1,10,frame/2.png,1,1,20,20\n\n2,11,img/3.jpg,0,0,9,9\n"
    )
    cols = cluster.read_protocol(path)
    np.testing.assert_array_equal(cols["TEMPLATE_ID"], [1, 1, 2])
    np.testing.assert_array_equal(cols["SUBJECT_ID"], [10, 10, 11])
    assert cols["FILENAME"].tolist() == ["img/1.jpg", "frame/2.png", "img/3.jpg"]
    emb = np.array([[1.0, 0], [3.0, 3.0], [0, 2.0]])
    feats, subjects, templates = cluster.template_embeddings(
        emb, cols["TEMPLATE_ID"], cols["SUBJECT_ID"]
    )
    want = np.array([1 + 1 / np.sqrt(2), 1 / np.sqrt(2)])
    np.testing.assert_allclose(feats[0], want / np.linalg.norm(want))
    assert subjects.tolist() == [10, 11] and templates.tolist() == [1, 2]

    bad = tmp_path / "cs2.csv"
    bad.write_text("TEMPLATE,SUBJECT_ID,FILE\n1,2,x.jpg\n")
    with pytest.raises(ValueError, match="TEMPLATE_ID, SUBJECT_ID, FILENAME"):
        cluster.read_protocol(bad)
    mixed = np.array([10, 12, 11])
    with pytest.raises(ValueError, match="several SUBJECT_IDs"):
        cluster.template_embeddings(emb, cols["TEMPLATE_ID"], mixed)
