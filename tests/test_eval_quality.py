"""Quality evaluation: error-versus-reject on synthetic data whose noise depends on quality, the
exact ERC definition against a slow loop, the plots as valid PNGs of the stated sizes, and the
recognisability of quality levels against a loop."""

import csv

import numpy as np
import pytest
import scipy.stats
from PIL import Image

from magjax.eval import quality


def synthetic(seed=0, identities=60, per_id=10, dim=32):
    """Raw embeddings: identity centre + noise shrinking with quality, magnitude growing with it."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(identities, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    ident = np.repeat(np.arange(identities), per_id)
    q = rng.uniform(0, 1, ident.size)
    noise = rng.normal(size=(ident.size, dim)) / np.sqrt(dim) * (1.6 - 1.4 * q)[:, None]
    raw = (centres[ident] + noise) * (10 + 30 * q)[:, None]
    # all genuine pairs, and impostor pairs at random
    gi, gj = np.triu_indices(per_id, 1)
    genuine = np.concatenate([np.stack([gi, gj], 1) + k * per_id for k in range(identities)])
    a, b = rng.integers(0, ident.size, (2, 20000))
    impostor = np.stack([a, b], 1)[ident[a] != ident[b]]
    pairs = np.concatenate([genuine, impostor])
    issame = np.r_[np.ones(len(genuine), bool), np.zeros(len(impostor), bool)]
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    scores = np.sum(unit[pairs[:, 0]] * unit[pairs[:, 1]], 1)
    return raw, pairs, scores, issame, rng


def test_erc_falls_when_low_quality_images_are_rejected():
    raw, pairs, scores, issame, rng = synthetic()
    mags = quality.magnitudes(raw)
    curve = quality.error_versus_reject(mags, pairs, scores, issame)
    fnmr = curve["fnmr"]
    assert fnmr[0] > 0.2  # a hard enough starting point
    assert fnmr[10] < 0.5 * fnmr[0]  # half the images rejected
    assert fnmr[-1] < 0.2 * fnmr[0]
    assert np.all(np.diff(fnmr[:15]) <= 0.02)  # (nearly) monotone
    # a random "quality" does not help
    random_curve = quality.error_versus_reject(rng.random(mags.size), pairs, scores, issame)
    assert random_curve["fnmr"][10] > 0.8 * random_curve["fnmr"][0]
    # recomputed threshold variant also falls
    recomputed = quality.error_versus_reject(mags, pairs, scores, issame, threshold="recomputed")
    assert recomputed["fnmr"][10] < 0.6 * recomputed["fnmr"][0]


def slow_erc(q, pairs, scores, issame, fractions, fmr):
    imp = np.sort(scores[~issame])[::-1]
    t = imp[int(np.floor(fmr * imp.size))]
    order = np.argsort(q, kind="stable")
    out = []
    for r in fractions:
        rejected = set(order[: int(np.floor(r * q.size + 1e-9))].tolist())
        keep = np.array([i not in rejected and j not in rejected for i, j in pairs])
        g = scores[keep & issame]
        out.append((np.mean(g <= t), t, g.size, np.sum(keep & ~issame)))
    return out


def test_erc_definition_against_slow_loop():
    rng = np.random.default_rng(1)
    q = rng.integers(0, 5, 40).astype(float)  # many ties: broken by image index
    pairs = rng.integers(0, 40, (300, 2))
    issame = rng.random(300) < 0.3
    scores = rng.normal(size=300) + issame
    fractions = np.array([0.0, 0.1, 0.25, 0.5])
    got = quality.error_versus_reject(q, pairs, scores, issame, fractions, fmr=0.05)
    for k, (fnmr, t, ng, ni) in enumerate(slow_erc(q, pairs, scores, issame, fractions, 0.05)):
        assert got["fnmr"][k] == pytest.approx(fnmr)
        assert got["threshold"][k] == t
        assert got["kept_genuine"][k] == ng and got["kept_impostor"][k] == ni
    # the fixed threshold accepts at most fmr of all impostors
    assert np.sum(scores[~issame] > got["threshold"][0]) <= 0.05 * np.sum(~issame)


def test_threshold_at_fmr():
    imp = np.arange(1000.0)
    t = quality.threshold_at_fmr(imp, 1e-3)
    assert t == 998.0 and np.sum(imp > t) == 1
    with pytest.raises(ValueError, match="impostor"):
        quality.threshold_at_fmr(np.array([]))


def png_size(path):
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_plots_and_csv(tmp_path):
    raw, pairs, scores, issame, rng = synthetic(identities=20)
    mags = quality.magnitudes(raw)
    curve = quality.error_versus_reject(mags, pairs, scores, issame)
    quality.plot_erc({"synthetic": curve, "other": curve}, tmp_path / "erc.png")
    assert png_size(tmp_path / "erc.png") == (800, 450)
    quality.plot_magnitude_histograms({"a": mags, "b": mags + 5}, tmp_path / "hist.png")
    assert png_size(tmp_path / "hist.png") == (800, 450)

    quality.write_erc_csv(curve, tmp_path / "erc.csv")
    with open(tmp_path / "erc.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(quality.ERC_FRACTIONS)
    assert float(rows[4]["reject_fraction"]) == pytest.approx(0.2)
    assert float(rows[4]["fnmr"]) == curve["fnmr"][4]
    assert int(rows[0]["kept_genuine"]) == issame.sum()

    # mean faces: image brightness follows the magnitude, so bin means get brighter
    n = mags.size
    level = (mags - mags.min()) / np.ptp(mags)
    images = np.clip(level[:, None, None, None] * 255 + rng.normal(0, 5, (n, 16, 16, 3)), 0, 255)
    faces, edges, counts = quality.mean_faces(images.astype(np.uint8), mags, num_bins=6)
    assert faces.shape == (6, 16, 16, 3) and counts.sum() == n
    assert np.all(np.diff(edges) > 0)
    brightness = faces.reshape(6, -1).mean(1)
    assert np.all(np.diff(brightness[counts > 0]) > 0)
    quality.plot_mean_faces(faces, edges, counts, tmp_path / "mean_faces.png")
    assert png_size(tmp_path / "mean_faces.png") == (6 * 160, 200)


def _levelled(seed, noise_by_level, identities=80, per_level=2, dim=16):
    """Raw embeddings of 5 quality levels (4 = clean): identity centre + noise of the given
    size per level, at random magnitudes (recognisability must ignore them)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(identities, dim))
    ident = np.repeat(np.arange(identities), 5 * per_level)
    levels = np.tile(np.repeat(np.arange(5), per_level), identities)
    noise = rng.normal(size=(ident.size, dim)) * np.asarray(noise_by_level)[levels, None]
    raw = (centres[ident] + noise) * rng.uniform(5, 50, (ident.size, 1))
    return raw, ident, levels


def test_recognisability_vs_quality():
    raw, ident, levels = _levelled(0, [2.0, 1.5, 1.0, 0.6, 0.3])
    rho = quality.recognisability_vs_quality(raw, ident, levels, clean_level=4)
    # Independent computation: a loop over images, the reference the mean unit clean embedding.
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    cosines, scored_levels = [], []
    for i in range(len(raw)):
        if levels[i] == 4:
            continue
        ref = unit[(ident == ident[i]) & (levels == 4)].sum(0)
        cosines.append(unit[i] @ ref / np.linalg.norm(ref))
        scored_levels.append(levels[i])
    assert rho == pytest.approx(scipy.stats.spearmanr(cosines, scored_levels).statistic, abs=1e-12)
    assert rho > 0.5
    # Magnitudes do not matter; noise independent of the level gives ~0; reversed, negative.
    scale = np.random.default_rng(1).uniform(0.1, 10, (len(raw), 1))
    assert quality.recognisability_vs_quality(raw * scale, ident, levels, 4) == pytest.approx(rho)
    flat = quality.recognisability_vs_quality(*_levelled(2, [1.0] * 5), clean_level=4)
    assert abs(flat) < 0.1
    assert (
        quality.recognisability_vs_quality(*_levelled(3, [0.3, 0.6, 1.0, 1.5, 0.3]), clean_level=4)
        < -0.5
    )


def test_recognisability_needs_a_clean_reference_per_identity():
    raw, ident, levels = _levelled(0, [1.0] * 5)
    keep = ~((ident == 7) & (levels == 4))
    with pytest.raises(ValueError, match=r"identities \[7\] have no image at quality level 4"):
        quality.recognisability_vs_quality(raw[keep], ident[keep], levels[keep], clean_level=4)


def test_a_failed_write_leaves_the_previous_csv_and_plot(tmp_path, monkeypatch):
    """The ERC CSV and the plots are written whole or not at all (magjax.files): a write that
    fails midway keeps the previous file and leaves no temporary one."""
    import matplotlib.figure

    raw, pairs, scores, issame, _ = synthetic(identities=20)
    curve = quality.error_versus_reject(quality.magnitudes(raw), pairs, scores, issame)
    csv_path, png_path = tmp_path / "erc.csv", tmp_path / "erc.png"
    csv_path.write_text("previous\n")
    png_path.write_bytes(b"previous")
    short = {**curve, "fnmr": curve["fnmr"][:-1]}  # fails after the header and some rows
    with pytest.raises(ValueError):
        quality.write_erc_csv(short, csv_path)

    def half_a_png(figure, fname, **kwargs):
        fname.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_a_png)
    with pytest.raises(OSError, match="disk full"):
        quality.plot_erc({"synthetic": curve}, png_path)
    assert csv_path.read_text() == "previous\n" and png_path.read_bytes() == b"previous"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["erc.csv", "erc.png"]
