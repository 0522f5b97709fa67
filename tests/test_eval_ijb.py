"""IJB-B/C pipeline: readers, 5-point alignment, aggregation modes and TAR@FAR, end to end on a
synthetic mini benchmark written in the real file formats (meta files + loose-crop JPEGs)."""

import numpy as np
import pytest
from PIL import Image
from skimage.transform import SimilarityTransform, warp

from magjax.eval import align, ijb


def smooth_face(rng, size=112):
    """A random smooth RGB texture standing in for one identity's aligned face."""
    low = rng.integers(0, 256, size=(8, 8, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC))


def loose_crop(rng, aligned, shape=(150, 170)):
    """Places an aligned face into a larger image by a random similarity transform.

    Returns the loose crop and the five landmarks (x, y) in its pixel coordinates.
    """
    t = SimilarityTransform(
        scale=rng.uniform(0.9, 1.2),
        rotation=rng.uniform(-0.3, 0.3),
        translation=rng.uniform(5, 25, size=2),
    )
    image = warp(aligned, t.inverse, output_shape=shape, order=1, preserve_range=True)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), t(align.ARCFACE_TEMPLATE)


def test_alignment_maps_landmarks_onto_the_template():
    # A bright 3x3 dot on each landmark of a loose crop: after alignment the dots must sit on
    # the template points.
    image = np.zeros((160, 180, 3), np.uint8)
    t = SimilarityTransform(scale=1.3, rotation=0.25, translation=(30.0, 10.0))
    landmarks = np.round(t(align.ARCFACE_TEMPLATE))
    for x, y in landmarks.astype(int):
        image[y - 1 : y + 2, x - 1 : x + 2] = 255
    out = align.align_face(image, landmarks)
    assert out.shape == (112, 112, 3) and out.dtype == np.uint8
    np.testing.assert_allclose(
        align.estimate_transform(landmarks)(landmarks), align.ARCFACE_TEMPLATE, atol=0.6
    )
    gray = out[..., 0].astype(np.float64)
    for tx, ty in align.ARCFACE_TEMPLATE:
        x0, y0 = int(tx) - 6, int(ty) - 6
        patch = gray[y0 : y0 + 13, x0 : x0 + 13]
        ys, xs = np.mgrid[y0 : y0 + 13, x0 : x0 + 13]
        cx, cy = (patch * xs).sum() / patch.sum(), (patch * ys).sum() / patch.sum()
        # the landmarks were rounded to whole pixels: their fit is off by at most ~0.5 px
        assert abs(cx - tx) < 0.8 and abs(cy - ty) < 0.8, (cx, cy, tx, ty)
    # exact landmarks: the fitted transform is exact
    exact = t(align.ARCFACE_TEMPLATE)
    np.testing.assert_allclose(
        align.estimate_transform(exact)(exact), align.ARCFACE_TEMPLATE, atol=1e-9
    )
    # a 224 crop uses the template scaled by 2
    np.testing.assert_allclose(
        align.estimate_transform(exact, 224)(exact), 2 * align.ARCFACE_TEMPLATE, atol=1e-9
    )


def test_alignment_recovers_the_face():
    rng = np.random.default_rng(1)
    face = smooth_face(rng)
    crop, landmarks = loose_crop(rng, face)
    back = align.align_face(crop, landmarks)
    inner = (slice(10, 102), slice(10, 102))  # skip the border the loose crop may cut
    assert np.abs(back[inner].astype(int) - face[inner].astype(int)).mean() < 3.0


def test_alignment_rejects_bad_landmarks():
    with pytest.raises(ValueError, match=r"\[5, 2\]"):
        align.align_face(np.zeros((50, 50, 3), np.uint8), np.zeros((4, 2)))


def test_tar_at_far_reads_the_roc_like_the_official_code():
    # genuine 0.9 0.8 0.4, impostor 0.85 0.3 0.2 0.1. After drop_intermediate and flipping:
    # fpr [1, .25, .25, 0, 0], tpr [1, 1, 1/3, 1/3, 0].
    labels = np.array([1, 1, 1, 0, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.4, 0.85, 0.3, 0.2, 0.1])
    tars, fpr, tpr = ijb.tar_at_far(labels, scores, (1e-6, 0.2, 0.7))
    np.testing.assert_allclose(fpr, [1, 0.25, 0.25, 0, 0])
    np.testing.assert_allclose(tpr, [1, 1, 1 / 3, 1 / 3, 0])
    # nearest FPR; at the vertical step (two points with fpr .25) the first = highest TPR
    assert tars == {"1e-06": pytest.approx(1 / 3), "0.2": 1.0, "0.7": 1.0}


def slow_templates(feats, templates, medias):
    """insightface image2template_feature as the reference file describes it, as loops."""
    uniq = np.unique(templates)
    out = np.zeros((uniq.size, feats.shape[1]))
    for i, t in enumerate(uniq):
        rows = np.where(templates == t)[0]
        total = 0
        for m in np.unique(medias[rows]):
            total = total + feats[rows[medias[rows] == m]].mean(0)
        out[i] = total / np.linalg.norm(total)
    return out, uniq


def write_benchmark(root, seed=0, identities=5, prefix="ijbc"):
    """A mini IJB-C in the insightface layout. Returns per-image identity, in tid_mid order."""
    rng = np.random.default_rng(seed)
    faces = [smooth_face(rng) for _ in range(identities)]
    (root / "loose_crop").mkdir(parents=True)
    (root / "meta").mkdir()
    rows, lmk_rows, owner = [], [], {}
    image_no = 0
    template_ids = rng.permutation(np.arange(100, 100 + 3 * identities) * 7)
    for k, tid in enumerate(template_ids):
        ident = k % identities
        owner[int(tid)] = ident
        for media in rng.choice([1, 2, 3, 4], size=rng.integers(1, 3), replace=False):
            for _ in range(rng.integers(1, 3)):
                image_no += 1
                name = f"{image_no}.jpg"
                crop, lmk = loose_crop(rng, faces[ident])
                Image.fromarray(crop).save(root / "loose_crop" / name, quality=95)
                rows.append((name, int(tid), int(media), ident))
                score = rng.uniform(0.5, 1.0)
                lmk_rows.append(
                    name + " " + " ".join(f"{v:.4f}" for v in lmk.ravel()) + f" {score:.6f}"
                )
    with open(root / "meta" / f"{prefix}_face_tid_mid.txt", "w") as f:
        f.writelines(f"{n} {t} {m}\n" for n, t, m, _ in rows)
    # landmark file in another order: rows are matched by image name
    with open(root / "meta" / f"{prefix}_name_5pts_score.txt", "w") as f:
        f.writelines(line + "\n" for line in reversed(lmk_rows))
    with open(root / "meta" / f"{prefix}_template_pair_label.txt", "w") as f:
        for i, a in enumerate(template_ids):
            for b in template_ids[i + 1 :]:
                f.write(f"{a} {b} {int(owner[int(a)] == owner[int(b)])}\n")
    return np.array([r[3] for r in rows]), faces


def embed(batch):
    """A fixed 'network': 14x14 block means of the grey image, centred (not flip-invariant)."""
    gray = batch.astype(np.float64).mean(-1)
    pooled = gray.reshape(len(batch), 14, 8, 14, 8).mean((2, 4)).reshape(len(batch), -1)
    return (pooled - pooled.mean(1, keepdims=True)) / 10.0


def test_mini_benchmark_end_to_end(tmp_path):
    root = tmp_path / "IJB" / "IJBC"
    identity, faces = write_benchmark(root)
    meta = ijb.load_meta(tmp_path / "IJB", "IJBC")  # parent of IJBC/ works too
    assert meta.names.size == identity.size and meta.labels.sum() > 0
    # the landmark rows follow tid_mid order after the by-name match
    lines = (root / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines()
    first = next(line for line in lines if line.startswith(meta.names[0] + " "))
    np.testing.assert_allclose(
        meta.landmarks[0].ravel(), [float(v) for v in first.split()[1:11]], rtol=1e-6
    )

    aligned = np.concatenate(list(ijb.iter_aligned(meta, batch_size=4)))
    inner = (slice(None), slice(10, 102), slice(10, 102))
    want = np.stack([faces[i] for i in identity])
    assert np.abs(aligned[inner].astype(int) - want[inner].astype(int)).mean() < 4.0

    plain, flipped = ijb.extract_features(meta, embed, batch_size=4, progress=False)
    np.testing.assert_allclose(plain, embed(aligned))
    np.testing.assert_allclose(flipped, embed(aligned[:, :, ::-1]))

    results = ijb.evaluate_features(meta, plain, flipped)
    assert set(results) == set(ijb.default_modes())
    for name, r in results.items():
        assert list(r["tar_at_far"]) == [repr(x) for x in ijb.FAR_TARGETS]
        # identities are well separated by this 'network': every genuine pair beats all impostors
        assert all(v == 1.0 for v in r["tar_at_far"].values()), name

    # N1D1F1 scores equal the slow reference aggregation of the description
    feats = (plain + flipped) * meta.faceness[:, None]
    tf, uniq = slow_templates(feats, meta.templates, meta.medias)
    ref_scores = np.array(
        [
            tf[np.searchsorted(uniq, a)] @ tf[np.searchsorted(uniq, b)]
            for a, b in zip(meta.pair_t1, meta.pair_t2, strict=True)
        ]
    )
    got_feats = ijb.image_features(plain, flipped, meta.faceness)
    tfg, uniqg = ijb.template_features(got_feats, meta.templates, meta.medias)
    np.testing.assert_array_equal(uniqg, uniq)
    got = ijb.pair_scores(tfg, uniqg, meta.pair_t1, meta.pair_t2, batch_size=7)
    np.testing.assert_allclose(got, ref_scores, atol=1e-12)


def test_aggregation_modes_against_slow_loops():
    rng = np.random.default_rng(4)
    n, d = 60, 6
    templates = rng.integers(0, 8, n) * 3 + 5
    medias = rng.integers(0, 4, n)  # the same media id in different templates is unrelated
    plain = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=(n, 1))
    flipped = plain + 0.1 * rng.normal(size=(n, d))
    face = rng.uniform(0.2, 1, n)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    cases = {
        ("insightface", True, False, True): (plain + flipped) * face[:, None],
        ("insightface", False, True, True): unit(plain + flipped),
        ("insightface", True, False, False): plain * face[:, None],
    }
    for (method, det, norm_off, flip), feats in cases.items():
        got = ijb.image_features(
            plain,
            flipped,
            face,
            method=method,
            use_flip_test=flip,
            use_norm_score=not norm_off,
            use_detector_score=det,
        )
        np.testing.assert_allclose(got, feats)
        tf, _ = ijb.template_features(got, templates, medias, method)
        np.testing.assert_allclose(tf, slow_templates(feats, templates, medias)[0], atol=1e-12)

    # MagFace: media mean of raw features; plain mode normalises the media, '+' keeps norms
    uniq = np.unique(templates)
    raw = plain + flipped
    for method in ("magface", "magface_plus"):
        want = []
        for t in uniq:
            rows = np.where(templates == t)[0]
            media = [raw[rows[medias[rows] == m]].mean(0) for m in np.unique(medias[rows])]
            media = np.array(media)
            if method == "magface":
                media = unit(media)
            want.append(media.mean(0))
        feats = ijb.image_features(plain, flipped, method=method)
        tf, _ = ijb.template_features(feats, templates, medias, method)
        np.testing.assert_allclose(tf, unit(np.array(want)), atol=1e-12)

    # AdaFace norm_weighted_avg flip fusion
    n1, n2 = np.linalg.norm(plain, axis=1), np.linalg.norm(flipped, axis=1)
    want = unit((n1[:, None] * unit(plain) + n2[:, None] * unit(flipped)) / (n1 + n2)[:, None])
    np.testing.assert_allclose(ijb.image_features(plain, flipped, method="adaface"), want)


def test_reader_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "ijbc_template_pair_label.txt"
    bad.write_text("1 2 1\n3 4\n")
    with pytest.raises(ValueError, match="t1 t2 label"):
        ijb.read_template_pair_label(bad)
    lm = tmp_path / "ijbc_name_5pts_score.txt"
    lm.write_text("1.jpg 1 2 3 4 5 6 7 8 9 10 0.9\n2.jpg 1 2 3\n")
    with pytest.raises(ValueError, match=r"ijbc_name_5pts_score.txt:2: .*12 fields"):
        ijb.read_name_5pts_score(lm)
    tid = tmp_path / "ijbc_face_tid_mid.txt"
    tid.write_text("1.jpg 1 x\n")
    with pytest.raises(ValueError, match=r"ijbc_face_tid_mid.txt:1: template/media ids"):
        ijb.read_face_tid_mid(tid)
    with pytest.raises(FileNotFoundError, match="nothere"):
        ijb.load_meta(tmp_path / "nothere", "IJBB")


def test_pair_file_with_garbage_is_an_error(tmp_path):
    bad = tmp_path / "ijbb_template_pair_label.txt"
    bad.write_text("1 2 1\n3 x 0\n5 6 1\n")
    with pytest.raises(ValueError, match="ijbb_template_pair_label.txt: expected lines"):
        ijb.read_template_pair_label(bad)
    bad.write_text("1 2 1\n3 4 2\n")
    with pytest.raises(ValueError, match="0 or 1"):
        ijb.read_template_pair_label(bad)


def test_unreadable_loose_crop_names_the_file(tmp_path):
    (tmp_path / "7.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(OSError, match="7.jpg"):
        ijb.load_aligned(tmp_path / "7.jpg", align.ARCFACE_TEMPLATE)
