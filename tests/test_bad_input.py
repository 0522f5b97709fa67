"""Bad input where data enters magjax: every case is an error naming the file (or a counted,
logged skip where skipping is what the user asked for), never a crash, a hang or silence.

Fixtures are built in the real formats (RecordIO, image folders, verification .bin pickles,
torch zip checkpoints) in tmp_path; memory bounds are tested with limits of a few MB.
"""

import io
import logging
import os
import pickle
import struct
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from magjax import convert, extract
from magjax.data import builders, recordio
from magjax.data import verification_bin as vb
from magjax.errors import UserError


def _jpeg(seed: int, size: int = 112) -> bytes:
    """A natural-ish image (smooth gradients + noise) encoded as JPEG by Pillow."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * xx + seed), np.cos(5 * yy - seed), xx * yy], -1)
    img = np.clip(127 + 100 * base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A 57-byte PNG that declares width x height pixels (over Pillow's bomb limit)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _corrupt_scan(seed: int = 0) -> bytes:
    """A JPEG with 64 random bytes in the middle of its entropy-coded scan: Pillow decodes it to
    garbage without a word, libjpeg (strict) reports corrupt data."""
    data = bytearray(_jpeg(seed))
    sos = data.index(b"\xff\xda")
    mid = sos + (len(data) - sos) // 2
    data[mid : mid + 64] = np.random.default_rng(seed).integers(0, 256, 64, np.uint8).tobytes()
    data = bytes(data)
    Image.open(io.BytesIO(data)).load()  # what Pillow alone accepts
    return data


BAD_IMAGES = {
    "bomb": _png_bomb(),
    "corrupt_scan": _corrupt_scan(),
    "truncated": _jpeg(1)[:-300],
}


# ----------------------------------------------------------------------------- single images


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_unreadable_image_is_an_error_naming_it(kind):
    from magjax.data import images

    with pytest.raises(images.UnreadableImageError, match="^faces/x.jpg cannot be decoded: "):
        images.open_image(BAD_IMAGES[kind], "faces/x.jpg")
    assert images.open_image(_jpeg(2), "ok").size == (112, 112)


def test_truncated_images_stay_errors_if_a_library_allows_them(monkeypatch, caplog):
    from magjax.data import images

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as tfds' thumbnails do
    truncated = _jpeg(1)[:-300]
    Image.open(io.BytesIO(truncated)).load()  # Pillow alone now fills the rest with grey
    with caplog.at_level(logging.WARNING), pytest.raises(images.UnreadableImageError):
        images.open_image(truncated, "t.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert "LOAD_TRUNCATED_IMAGES was on" in caplog.text


def test_magjax_imports_leave_truncated_images_off():
    import magjax.data.pipeline  # noqa: F401  (tfds, grain)
    import magjax.evaluate  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_extract_skips_or_stops_on_unreadable_images(tmp_path, kind):
    good, bad = tmp_path / "good.jpg", tmp_path / f"{kind}.jpg"
    good.write_bytes(_jpeg(3))
    bad.write_bytes(BAD_IMAGES[kind])
    skipped = []
    batches = list(extract.iter_batches([good, bad, good], 2, True, skipped))
    assert skipped == [str(bad)]
    assert [names for names, _ in batches] == [[str(good), str(good)]]
    with pytest.raises(UserError, match=f"{kind}.jpg cannot be decoded"):
        list(extract.iter_batches([good, bad], 2, False, []))


def test_evaluate_and_ijb_readers_name_the_unreadable_file(tmp_path):
    from magjax.data.images import crop_face_box
    from magjax.eval import ijb

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(BAD_IMAGES["bomb"])
    with pytest.raises(UserError, match=r"row 2: .*bomb.png cannot be decoded: .*exceeds limit"):
        crop_face_box(bomb, {}, 0)
    with pytest.raises(UserError, match=r"bomb.png cannot be decoded: .*exceeds limit"):
        ijb.load_aligned(bomb, np.zeros((5, 2), np.float32))


# ----------------------------------------------------------------------------- verification .bin


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_bin_with_unreadable_image(tmp_path, kind):
    path = vb.write_bin(
        tmp_path / "v.bin", [_jpeg(1), _jpeg(2), BAD_IMAGES[kind], _jpeg(3)], [True, False]
    )
    with pytest.raises(UserError, match=r"v.bin: image 2 \(pair 1\) cannot be decoded"):
        vb.load_bin(path)
    summary = vb.inspect_bin(path)
    assert summary["corrupt_images"] == [2] and summary["image_sizes"] == {"112x112": 3}


class _DeclaredArray:
    """Pickles as a call that makes a uint8 array of ``size`` bytes without storing them."""

    def __init__(self, size: int, via: str):
        self.size, self.via = size, via

    def __reduce__(self):
        if self.via == "ndarray":
            return (np.ndarray, ((self.size,), np.dtype("u1")))
        return (np._core.multiarray._reconstruct, (np.ndarray, (self.size,), b"u1"))


@pytest.mark.parametrize("via", ["ndarray", "_reconstruct"])
def test_bin_declaring_a_large_array_is_refused_before_allocating(tmp_path, via):
    size = 8 << 20  # 8 MiB declared by a file of about 200 bytes
    array = _DeclaredArray(size, via)
    path = tmp_path / "tiny.bin"
    path.write_bytes(pickle.dumps(([array] * 4, [True, False]), protocol=2))
    assert path.stat().st_size < 300
    tracemalloc.start()
    try:
        with pytest.raises(vb.UnsafePickleError, match="tiny.bin: "):
            vb.read_bin(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < size // 8  # refused before the array (let alone 4 copies) exists


def test_bin_referencing_one_image_many_times_is_refused(tmp_path):
    image = np.frombuffer(_jpeg(4), np.uint8).copy()  # a real image, stored once
    path = tmp_path / "many.bin"
    path.write_bytes(pickle.dumps(([image] * 64, [True] * 32), protocol=4))
    assert path.stat().st_size < 2 * image.nbytes
    with pytest.raises(
        vb.UnsafePickleError,
        match=r"many.bin: its 64 images hold \d+ bytes, "
        r"more than the file's \d+",
    ):
        vb.read_bin(path)


def test_bin_with_deeply_nested_issame_is_a_clear_error(tmp_path):
    depth = 200_000
    a, b = _jpeg(5), _jpeg(6)
    raw = b"".join(
        [
            b"\x80\x03]" + b"(",  # PROTO 3, EMPTY_LIST, MARK
            b"B" + struct.pack("<I", len(a)) + a,
            b"B" + struct.pack("<I", len(b)) + b,  # BINBYTES
            b"e",  # APPENDS
            b"]" * (depth + 1) + b"a" * depth,  # issame = [[[[ ... ]]]], built without recursion
            b"\x86.",  # TUPLE2, STOP
        ]
    )
    path = tmp_path / "deep.bin"
    path.write_bytes(raw)
    with pytest.raises(UserError, match=r"deep.bin: issame\[0\] is \[\[\[\[.*expected a bool"):
        vb.read_bin(path)


def test_bin_with_zero_pairs_is_an_error(tmp_path):
    path = vb.write_bin(tmp_path / "empty.bin", [], [])
    with pytest.raises(UserError, match="empty.bin: holds 0 pairs"):
        vb.load_bin(path)


# ----------------------------------------------------------------------------- prepare: rec


def _summary(root):
    return builders.inspect_dataset(root)


def test_rec_prepare_skips_unreadable_images(tmp_path, caplog):
    imgs = [_jpeg(i) for i in range(6)]
    imgs[1], imgs[4] = BAD_IMAGES["bomb"], BAD_IMAGES["corrupt_scan"]
    src = recordio.write_face_record(tmp_path / "rec", imgs, [0, 0, 1, 1, 2, 2], header=False)
    with caplog.at_level(logging.WARNING):
        root = builders.prepare("rec", src, tmp_path / "out")
    s = _summary(root)
    assert (s["num_examples"], s["num_classes"], s["skipped"]) == (4, 3, 2)
    assert sorted(s["metadata"]["skipped_source_ids"]) == [1, 4]
    assert "train.rec record 1 cannot be decoded: Image size" in caplog.text
    assert "train.rec record 4 cannot be decoded: Corrupt JPEG data" in caplog.text


def test_rec_truncated_inside_its_last_record_keeps_the_rest(tmp_path, caplog):
    src = recordio.write_face_record(
        tmp_path / "rec", [_jpeg(i) for i in range(6)], [0, 0, 1, 1, 2, 2], header=False
    )
    rec = src / "train.rec"
    rec.write_bytes(rec.read_bytes()[:-500])  # cut inside record 5
    with caplog.at_level(logging.WARNING):
        root = builders.prepare("rec", src, tmp_path / "out")
    s = _summary(root)
    assert (s["num_examples"], s["skipped"]) == (5, 1)
    assert s["metadata"]["skipped_source_ids"] == [5]
    assert "record 5 at offset" in caplog.text and "truncated .rec" in caplog.text


@pytest.mark.parametrize("header", [True, False])
def test_rec_property_claiming_more_classes_than_the_labels_use(tmp_path, header):
    src = recordio.write_face_record(
        tmp_path / "rec", [_jpeg(i) for i in range(8)], [0, 1, 2, 3] * 2, header=header
    )
    recordio.write_property(src / "property", recordio.Property(1000, 112, 112, 8))
    with pytest.raises(
        recordio.RecordIOError,
        match=r"rec/property: says 1000 classes, but the labels in .*train.rec "
        r"use 4 \(0..3\)",
    ):
        builders.prepare("rec", src, tmp_path / "out")
    assert not (tmp_path / "out" / builders.MANIFEST).exists()


def test_damaged_manifest_is_an_error_naming_it(tmp_path):
    src = recordio.write_face_record(tmp_path / "rec", [_jpeg(i) for i in range(2)], [0, 1])
    root = builders.prepare("rec", src, tmp_path / "out")
    manifest = root / builders.MANIFEST
    manifest.write_text(manifest.read_text()[:40])
    for call in (
        lambda: builders.find_dataset_dir(root),
        lambda: builders.inspect_dataset(root),
        lambda: builders.prepare("rec", src, root),
    ):
        with pytest.raises(UserError, match=f"{manifest}: damaged dataset manifest, not JSON"):
            call()


# ----------------------------------------------------------------------------- prepare: folder


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_folder_prepare_skips_unreadable_images(tmp_path, caplog, monkeypatch):
    src = tmp_path / "faces"
    for i, name in enumerate(["alice/1.jpg", "alice/2.jpg", "bob/1.jpg"]):
        _write(src / name, _jpeg(i))
    _write(src / "alice/bomb.png", BAD_IMAGES["bomb"])
    _write(src / "bob/scan.jpg", BAD_IMAGES["corrupt_scan"])
    _write(src / "bob/truncated.jpg", BAD_IMAGES["truncated"])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with caplog.at_level(logging.WARNING):
        root = builders.prepare("folder", src, tmp_path / "out")
    s = _summary(root)
    assert (s["num_examples"], s["num_classes"], s["skipped"]) == (3, 2, 3)
    for name in ("alice/bomb.png", "bob/scan.jpg", "bob/truncated.jpg"):
        assert f"{name} (file " in caplog.text
    only_bad = tmp_path / "bad"
    _write(only_bad / "carol/scan.jpg", BAD_IMAGES["corrupt_scan"])
    with pytest.raises(UserError, match="bad: no readable image"):
        builders.prepare("folder", only_bad, tmp_path / "out2")


def test_folder_hidden_and_empty_directories_are_not_classes(tmp_path, caplog):
    src = tmp_path / "faces"
    for name in ["alice/1.jpg", "bob/1.jpg", ".cache/1.jpg", "alice/.hidden.jpg"]:
        _write(src / name, _jpeg(len(name)))
    (src / "empty").mkdir()
    _write(src / "notes/readme.txt", b"no image here")
    with caplog.at_level(logging.WARNING):
        names, files = builders.list_image_folder(src)
    assert names == ["alice", "bob"]
    assert [(os.path.relpath(p, src), label) for p, label in files] == [
        ("alice/1.jpg", 0),
        ("bob/1.jpg", 1),
    ]
    assert "skipping 2 identity folders without image files" in caplog.text
    assert str(src / "empty") in caplog.text and str(src / "notes") in caplog.text
    # The same in WebFace42M's split layout, whose parts may hold hidden entries too.
    split = tmp_path / "split"
    for name in ["0/id_a/1.jpg", "0/.DS_Store", "1/id_b/1.jpg", "1/.trash/x/1.jpg"]:
        _write(split / name, _jpeg(len(name)))
    (split / "1/id_empty").mkdir()
    names, files = builders.list_image_folder(split)
    assert names == ["id_a", "id_b"] and len(files) == 2


def test_folder_name_with_a_line_break_is_refused(tmp_path):
    src = tmp_path / "faces"
    _write(src / "alice/1.jpg", _jpeg(1))
    _write(src / "bob\nsmith/1.jpg", _jpeg(2))
    with pytest.raises(
        UserError,
        match=r"bob\\nsmith'?: an identity folder name may not contain "
        "a line break",
    ):
        builders.prepare("folder", src, tmp_path / "out")


# ----------------------------------------------------------------------------- checkpoints


torch = pytest.importorskip("torch")


def _tiny_state() -> dict:
    """A full state_dict of the ``tiny`` arch in PyTorch naming (values irrelevant here)."""
    from flax import traverse_util

    from magjax import models

    flat = traverse_util.flatten_dict(models.abstract_variables("tiny", embedding_dim=512))
    return {
        convert._torch_key(collection, tuple(path)): np.zeros(
            convert._torch_shape(spec.shape, path[-1]), np.float32
        )
        for (collection, *path), spec in flat.items()
    }


def test_checkpoint_missing_one_tensor_names_it_and_the_arch():
    state = _tiny_state()
    convert.convert_state_dict(state, "tiny")  # complete: converts
    del state["bn2.running_mean"]  # read to reorder the rows of fc.weight
    with pytest.raises(
        convert.ConversionError,
        match=r"arch 'tiny' \(1 missing tensors\): missing tensor "
        r"'bn2.running_mean' \(expected shape \(\d+,\)\)",
    ):
        convert.convert_state_dict(state, "tiny")


def test_corrupted_checkpoint_fails_its_crc(tmp_path):
    path = tmp_path / "backbone.pth"
    torch.save({"fc.weight": torch.randn(64, 64)}, path)
    assert isinstance(convert.load_checkpoint(path, "arcface_torch"), dict)
    with zipfile.ZipFile(path) as z:
        member = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    raw = bytearray(path.read_bytes())
    start = member.header_offset + 30 + len(member.filename) + len(member.extra)
    raw[start + 1000 : start + 1064] = bytes(64)  # 64 bytes of the tensor zeroed
    path.write_bytes(bytes(raw))
    with pytest.raises(
        convert.ConversionError,
        match="backbone.pth: damaged checkpoint: member 'backbone/data/0' fails its CRC-32 check",
    ):
        convert.load_checkpoint(path, "arcface_torch")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file (0 bytes), not a PyTorch checkpoint"),
        (bytes(range(7, 256)) * 4, "not a PyTorch checkpoint: neither a zip archive"),
        (
            b"\x80\x02" + bytes(range(200, 256)),
            "damaged or foreign file: its pickle cannot be read",
        ),
    ],
)
def test_non_checkpoints_get_distinct_messages(tmp_path, content, message):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(convert.ConversionError) as info:
        convert.load_checkpoint(path, "arcface_torch")
    text = str(info.value)
    assert text.startswith(f"{path}: {message}"), text
    assert "weights_only" not in text and "pickled objects other than tensors" not in text


def test_wrong_from_for_an_adaface_checkpoint_says_so(tmp_path):
    import argparse

    path = tmp_path / "adaface.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": argparse.Namespace(m=0.4)}, path)
    with pytest.raises(convert.ConversionError) as info:
        convert.load_checkpoint(path, "magface")
    text = str(info.value)
    assert "holds argparse.Namespace hyper-parameters" in text and "--from adaface" in text
    assert "weights_only" not in text and "pickled objects other than tensors" not in text


def test_wrong_from_for_a_magface_checkpoint_says_so():
    magface_layout = {"epoch": 25, "state_dict": {"module.features.fc.bias": torch.zeros(2)}}
    with pytest.raises(
        convert.ConversionError,
        match="m.pth: holds a 'state_dict' entry, as magface and adaface checkpoints do",
    ):
        convert.backbone_state_dict(magface_layout, "arcface_torch", "m.pth")
