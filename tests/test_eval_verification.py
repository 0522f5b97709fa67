"""10-fold verification against an independent slow implementation of the insightface loops."""

import numpy as np
import pytest
from scipy.interpolate import BSpline
from sklearn.model_selection import KFold

from magjax.eval import verification


def slow_evaluate(e1, e2, issame, nrof_folds=10):
    """The official loops, written out: one threshold at a time, sklearn KFold folds, and the
    old scipy interp1d(kind='slinear') as the degree-1 BSpline it built (knots repeat)."""
    dist = np.sum(np.square(e1 - e2), 1)
    idx = np.arange(len(issame))
    folds = list(KFold(n_splits=nrof_folds, shuffle=False).split(idx))

    def acc(th, d, s):
        pred = d < th
        tp = np.sum(pred & s)
        fp = np.sum(pred & ~s)
        tn = np.sum(~pred & ~s)
        fn = np.sum(~pred & s)
        tpr = 0 if tp + fn == 0 else tp / (tp + fn)
        fpr = 0 if fp + tn == 0 else fp / (fp + tn)
        return tpr, fpr, (tp + tn) / d.size

    th = np.arange(0, 4, 0.01)
    tprs = np.zeros((nrof_folds, th.size))
    fprs = np.zeros((nrof_folds, th.size))
    accs, best = np.zeros(nrof_folds), np.zeros(nrof_folds)
    for f, (train, test) in enumerate(folds):
        acc_train = np.array([acc(t, dist[train], issame[train])[2] for t in th])
        b = np.argmax(acc_train)
        for i, t in enumerate(th):
            tprs[f, i], fprs[f, i], _ = acc(t, dist[test], issame[test])
        accs[f] = acc(th[b], dist[test], issame[test])[2]
        best[f] = th[b]
    thv = np.arange(0, 4, 0.001)
    vals, fars = np.zeros(nrof_folds), np.zeros(nrof_folds)
    for f, (train, test) in enumerate(folds):
        far_train = np.array(
            [np.sum((dist[train] < t) & ~issame[train]) / np.sum(~issame[train]) for t in thv]
        )
        if far_train.max() >= 1e-3:
            order = np.argsort(far_train, kind="mergesort")
            x, y = far_train[order], thv[order]
            thr = float(BSpline(np.r_[x[0], x, x[-1]], y, 1)(1e-3))
        else:
            thr = 0.0
        pred = dist[test] < thr
        vals[f] = np.sum(pred & issame[test]) / np.sum(issame[test])
        fars[f] = np.sum(pred & ~issame[test]) / np.sum(~issame[test])
    return dict(
        accuracy=accs.mean(),
        std=accs.std(),
        best_thresholds=best,
        tpr=tprs.mean(0),
        fpr=fprs.mean(0),
        val=vals.mean(),
        val_std=vals.std(),
        far=fars.mean(),
    )


def random_pairs(seed, n, d=16, noise=0.9):
    rng = np.random.default_rng(seed)
    issame = rng.random(n) < 0.5
    a = rng.normal(size=(n, d))
    b = np.where(issame[:, None], a + noise * rng.normal(size=(n, d)), rng.normal(size=(n, d)))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    return unit(a), unit(b), issame


@pytest.mark.parametrize("seed,n", [(0, 600), (1, 1003), (2, 157)])
def test_matches_slow_official_loops(seed, n):
    e1, e2, issame = random_pairs(seed, n)
    got = verification.evaluate(e1, e2, issame)
    want = slow_evaluate(e1, e2, issame)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-12, err_msg=key)
    assert 0.5 < got["accuracy"] < 1.0  # a non-trivial case


def test_distance_on_a_threshold_is_not_accepted():
    # Distances exactly on grid values: the rule is strict, dist < threshold.
    e1 = np.zeros((20, 1))
    e2 = np.zeros((20, 1))
    e2[:, 0] = np.sqrt(np.where(np.arange(20) % 2 == 0, 0.25, 2.0))
    issame = np.arange(20) % 2 == 0
    got = verification.evaluate(e1, e2, issame)
    want = slow_evaluate(e1, e2, issame)
    np.testing.assert_array_equal(got["tpr"], want["tpr"])
    assert got["accuracy"] == 1.0
    # tpr at the 0.25 grid threshold itself is 0 (0.25 < 0.25 is false), at 0.26 it is 1.
    grid = verification.ACCURACY_THRESHOLDS
    assert got["tpr"][np.argmin(np.abs(grid - 0.25))] == 0.0
    assert got["tpr"][np.argmin(np.abs(grid - 0.26))] == 1.0


def test_folds_are_sklearn_kfold():
    for n, k in [(600, 10), (1003, 10), (23, 4)]:
        ours = verification.fold_bounds(n, k)
        theirs = [(t[0], t[-1] + 1) for _, t in KFold(n_splits=k).split(np.arange(n))]
        assert ours == theirs


def test_interp_threshold_duplicates_and_edges():
    far = np.array([0.0, 0.0, 0.0005, 0.0005, 0.002, 0.002, 0.01])
    thr = np.arange(far.size) * 0.1
    # last point with far <= 1e-3 is index 3 (0.0005), next is index 4 (0.002).
    want = 0.3 + (1e-3 - 0.0005) / (0.002 - 0.0005) * 0.1
    assert verification.interp_threshold(far, thr) == pytest.approx(want, abs=1e-15)
    ref = float(BSpline(np.r_[far[0], far, far[-1]], thr, 1)(1e-3))
    assert verification.interp_threshold(far, thr) == pytest.approx(ref, abs=1e-15)
    # exactly on a duplicated value: the last knot carrying it
    far2 = np.array([0.0, 1e-3, 1e-3, 1e-3, 0.5])
    assert verification.interp_threshold(far2, np.arange(5.0)) == pytest.approx(3.0, abs=1e-15)
    # bit-identical to the B-spline on random duplicate-laden curves
    rng = np.random.default_rng(0)
    for _ in range(200):
        far_r = np.sort(np.round(rng.random(50) * 0.004, 4))
        far_r[0] = 0.0
        if far_r[-1] < 1e-3:
            continue
        thr_r = np.sort(rng.random(50))
        ref_r = float(BSpline(np.r_[far_r[0], far_r, far_r[-1]], thr_r, 1)(1e-3))
        assert verification.interp_threshold(far_r, thr_r) == ref_r
    # target equal to the maximum: scipy's B-spline gives the last threshold, or 0.0 when the
    # maximum repeats (degenerate last knot interval)
    for far3 in ([0.0, 0.0, 1e-3, 1e-3], [0.0, 5e-4, 1e-3], [0.0, 1e-3]):
        far3 = np.asarray(far3)
        y3 = np.arange(1.0, far3.size + 1)
        ref3 = float(BSpline(np.r_[far3[0], far3, far3[-1]], y3, 1)(1e-3))
        assert verification.interp_threshold(far3, y3) == ref3


def test_run_flip_fusion_and_xnorm():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8)
    issame = rng.random(20) < 0.5
    proj = rng.normal(size=(8 * 8 * 3, 5))

    def embed(batch):  # not flip-invariant, so the flip matters
        return batch.reshape(len(batch), -1).astype(np.float64) @ proj / 100.0

    got = verification.run(embed, images, issame, batch_size=7)
    plain = embed(images)
    flipped = embed(images[:, :, ::-1, :])
    fused = plain + flipped
    fused /= np.linalg.norm(fused, axis=1, keepdims=True)
    want = verification.evaluate(fused[0::2], fused[1::2], issame)
    assert got["accuracy"] == want["accuracy"]
    np.testing.assert_allclose(got["tpr"], want["tpr"])
    xnorm = np.mean(np.r_[np.linalg.norm(plain, axis=1), np.linalg.norm(flipped, axis=1)])
    assert got["xnorm"] == pytest.approx(xnorm, rel=1e-12)


def test_bad_inputs():
    e1, e2, issame = random_pairs(0, 30)
    with pytest.raises(ValueError, match="30 embedding pairs but 29 issame"):
        verification.evaluate(e1, e2, issame[:29])
    with pytest.raises(ValueError, match="expected 2 per pair"):
        verification.run(lambda x: x, np.zeros((5, 2, 2, 3), np.uint8), issame[:3])
