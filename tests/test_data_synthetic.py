"""Synthetic identities: recoverable identity, quality that matters, the prepared dataset files."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from magjax.data import builders, synthetic, verification_bin


def _features(images: np.ndarray) -> np.ndarray:
    """Face interior in 8x8 blocks, divided by the image's mean level (removes the gain)."""
    c = images[:, 16:104, 16:96].astype(np.float64)
    c = c.reshape(len(images), 11, 8, 10, 8, 3).mean((2, 4))
    return (c / c.mean(axis=(1, 2, 3), keepdims=True)).reshape(len(images), -1)


def test_identity_recoverable_and_destroyed_by_low_quality():
    n, gallery, probes = 40, 4, 6
    cfg = synthetic.SyntheticConfig()
    ids = synthetic.sample_identities(np.random.default_rng(123), n)
    rng = np.random.default_rng(7)

    def images(quality, per):
        labels = np.repeat(np.arange(n), per)
        qual = np.full(len(labels), quality)
        return np.stack([im for im, _ in synthetic.generate(ids, labels, qual, rng, cfg)]), labels

    gal, gal_labels = images(synthetic.CLEAN, gallery)
    means = np.stack([_features(gal)[gal_labels == c].mean(0) for c in range(n)])

    def ncm_accuracy(quality):
        imgs, labels = images(quality, probes)
        d = ((_features(imgs)[:, None] - means[None]) ** 2).sum(-1)
        return (d.argmin(1) == labels).mean()

    clean, worst = ncm_accuracy(synthetic.CLEAN), ncm_accuracy(0)
    chance = 1 / n
    assert clean > 0.6 > 20 * chance  # identity survives the nuisance on clean images
    assert worst < clean - 0.2  # the lowest quality level destroys part of it


def test_degradation_strength_grows_as_quality_drops():
    ids = synthetic.sample_identities(np.random.default_rng(0), 30)
    clean = synthetic.render(ids, synthetic.sample_nuisance(np.random.default_rng(1), 30, 1.0))
    rng = np.random.default_rng(2)
    err = []
    for q in range(synthetic.NUM_QUALITY_LEVELS):
        out = [synthetic.degrade(img, q, rng) for img in clean]
        diffs = [np.abs(o.astype(int) - c).mean() for (o, _), c in zip(out, clean, strict=True)]
        err.append(np.mean(diffs))
        flags = [f for _, f in out]
        assert (q == synthetic.CLEAN) == all(f == 0 for f in flags)
    assert err[-1] == 0 and all(a > b for a, b in zip(err[:-1], err[1:], strict=True))


def test_config_validation():
    with pytest.raises(ValueError, match="quality_mix must be 5 non-negative probabilities"):
        synthetic.SyntheticConfig(quality_mix=(0.5, 0.5))
    with pytest.raises(ValueError, match="at least 2 training and 2 held-out"):
        synthetic.SyntheticConfig(num_heldout=1)


SMALL = dict(
    num_identities=12,
    images_per_identity=4,
    num_heldout=6,
    num_pairs=20,
    quality_images_per_level=2,
    seed=3,
)


def test_prepare_synthetic_dataset(tmp_path, capsys):
    root = builders.prepare("synthetic", None, tmp_path / "syn", **SMALL)
    s = builders.inspect_dataset(root)
    assert (s["num_examples"], s["num_classes"], s["skipped"]) == (48, 12, 0)
    assert s["metadata"]["generator"]["num_identities"] == 12
    assert s["metadata"]["generator"]["quality_mix"] == list(synthetic.SyntheticConfig.quality_mix)
    assert {"quality", "degradation"} <= set(s["features"])
    manifest = json.loads((root / builders.MANIFEST).read_text())
    assert manifest["verification_bins"] == ["verification.bin"]
    images, issame = verification_bin.load_bin(root / "verification.bin")
    assert images.shape == (40, 112, 112, 3) and issame.sum() == 10
    q = np.load(root / "quality.npz")
    assert q["images"].shape == (60, 112, 112, 3)
    assert np.bincount(q["quality"]).tolist() == [12] * 5
    assert set(q["labels"].tolist()) == set(range(6))
    assert np.array_equal(q["degradation"] == 0, q["quality"] == synthetic.CLEAN)

    # Training examples: labels in range, quality recorded, deterministic given the config.
    import tensorflow_datasets as tfds

    b = tfds.builder_from_directory(str(builders.find_dataset_dir(root)))
    src = b.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    by_id = {int(src[i]["source_id"]): src[i] for i in range(len(src))}
    again = synthetic.SyntheticFaces(synthetic.SyntheticConfig(**SMALL)).train_examples()
    for key, jpeg, label, quality, _ in again:
        ex = by_id[key]
        assert ex["image"] == jpeg and ex["label"] == label and ex["quality"] == quality
        assert Image.open(io.BytesIO(jpeg)).size == (112, 112)
    other = next(
        synthetic.SyntheticFaces(synthetic.SyntheticConfig(**{**SMALL, "seed": 4})).train_examples()
    )
    assert other[1] != by_id[0]["image"]

    # prepare() is idempotent (the demo calls it on every start) and refuses other knobs.
    assert builders.prepare("synthetic", None, tmp_path / "syn", **SMALL) == root
    with pytest.raises(FileExistsError):
        builders.prepare("synthetic", None, tmp_path / "syn", **{**SMALL, "seed": 9})


def _prepare_in_subprocess(out):
    from magjax.data import builders as b

    return str(b.prepare("synthetic", None, out, **SMALL))


def test_concurrent_prepare_builds_once(tmp_path):
    import multiprocessing

    out = tmp_path / "shared"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        roots = pool.map(_prepare_in_subprocess, [out, out])
    assert roots == [str(out), str(out)]
    assert builders.inspect_dataset(out)["num_examples"] == 48
