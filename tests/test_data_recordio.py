"""RecordIO reader / writer and the rec / folder TFDS builders, on fixtures in the real formats."""

import io
import json
import logging
import struct

import numpy as np
import pytest
from PIL import Image

from magjax.data import builders, recordio

MAGIC = struct.pack("<I", 0xCED7230A)


def _jpeg(seed: int, size: int = 112, comment: bytes | None = None, fmt: str = "JPEG") -> bytes:
    """A small natural-ish image (smooth gradients + noise) encoded with Pillow."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * xx + seed), np.cos(5 * yy - seed), xx * yy], -1)
    img = np.clip(127 + 100 * base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    kwargs = {"quality": 90} if fmt == "JPEG" else {}
    if comment is not None:
        kwargs["comment"] = comment
    Image.fromarray(img).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _jpeg_with_aligned_magic(seed: int, header_bytes: int) -> bytes:
    """A valid JPEG whose comment holds the magic twice at 4-byte-aligned record offsets."""
    probe = b"\x00\x00\x00\x00" + b"Q" * 8
    data = _jpeg(seed, comment=probe)
    pos = data.index(probe) + header_bytes
    pad = (-pos) % 4
    data = _jpeg(seed, comment=b"\x00" * pad + MAGIC + MAGIC + b"tail" + b"\x00" * (4 - pad))
    at = data.index(MAGIC) + header_bytes
    assert at % 4 == 0 and data[data.index(MAGIC) + 4 :].startswith(MAGIC)
    return data


def _parts(rec_bytes: bytes, offset: int) -> list[int]:
    """cflags of the physical parts of the record at offset (independent minimal parser)."""
    flags = []
    while True:
        magic, lrec = struct.unpack_from("<II", rec_bytes, offset)
        assert magic == 0xCED7230A
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        flags.append(cflag)
        offset += 8 + length + (-length) % 4
        if cflag in (0, 3):
            return flags


def test_writer_bytes_match_dmlc_layout(tmp_path):
    # Payload with the magic at aligned offset 4 and an unaligned copy at 9 (not split).
    payload = b"\x01\x02\x03\x04" + MAGIC + b"\x05" + MAGIC + b"\x06\x07"
    with recordio.RecordIOWriter(tmp_path / "a.rec", tmp_path / "a.idx") as w:
        w.write(7, payload)
        w.write(8, b"xyz")
    first = struct.pack("<II", 0xCED7230A, (1 << 29) | 4) + b"\x01\x02\x03\x04"
    rest = payload[8:]
    last = struct.pack("<II", 0xCED7230A, (3 << 29) | len(rest)) + rest + b"\0" * (-len(rest) % 4)
    second = struct.pack("<II", 0xCED7230A, 3) + b"xyz\0"
    assert (tmp_path / "a.rec").read_bytes() == first + last + second
    assert (tmp_path / "a.idx").read_text() == f"7\t0\n8\t{len(first + last)}\n"
    r = recordio.RecordIOReader(tmp_path / "a.rec", tmp_path / "a.idx")
    assert r.read(7) == payload and r.read(8) == b"xyz"


def test_pack_unpack_irheader():
    h, data = recordio.unpack(recordio.pack(recordio.IRHeader(0, 17.0, 5, 0), b"img"))
    assert (h.flag, h.label, h.id, h.id2, data) == (0, 17.0, 5, 0, b"img")
    raw = recordio.pack(recordio.IRHeader(0, np.array([3.0, 1.0]), 9, 0), b"img")
    # 'IfQQ' little endian + two float32 labels (not float64) + data.
    assert raw == struct.pack("<IfQQ", 2, 0.0, 9, 0) + struct.pack("<2f", 3.0, 1.0) + b"img"
    h, data = recordio.unpack(raw)
    assert h.flag == 2 and list(h.label) == [3.0, 1.0] and data == b"img"
    assert recordio.scalar_label(h) == 3.0


@pytest.fixture(scope="module")
def rec_dir(tmp_path_factory):
    """face2rec2-style .rec: header record, flag-2 labels, a 3-part record, 2 corrupt JPEGs."""
    d = tmp_path_factory.mktemp("rec")
    labels = [0, 0, 1, 1, 2, 2, 3, 1, 2]
    images = [_jpeg(i) for i in range(len(labels))]
    images[3] = _jpeg_with_aligned_magic(3, header_bytes=24 + 8)  # IRHeader + 2 float labels
    images[5] = images[5][: len(images[5]) // 2]  # truncated JPEG
    images[7] = b"not an image at all"
    recordio.write_face_record(d, images, labels, header=True, label_as_array=True)
    return d, images, labels


def test_header_rec_reads_back(rec_dir):
    d, images, labels = rec_dir
    fr = recordio.FaceRecord(d)
    assert fr.has_header and fr.num_classes == 4 and len(fr) == len(images)
    got = {data: label for _, label, data in fr}
    assert got == dict(zip(images, labels, strict=True))
    # The record holding the aligned magic was written as 3 parts and re-joined.
    rec = (d / "train.rec").read_bytes()
    flags = {k: _parts(rec, off) for k, off in fr.reader.index.items()}
    assert sorted(flags.values()).count([1, 2, 3]) == 1
    assert sum(f == [0] for f in flags.values()) == len(flags) - 1
    # Identity records give [start, end) image keys per class (sorted by label).
    hdr, _ = recordio.unpack(fr.reader.read(0))
    assert hdr.flag == 2 and list(hdr.label) == [10, 14]
    ident, _ = recordio.unpack(fr.reader.read(11))  # class 1
    assert list(ident.label) == [3, 6]


def test_plain_im2rec_without_header(tmp_path):
    images, labels = [_jpeg(i) for i in range(4)], [2, 0, 1, 0]
    recordio.write_face_record(tmp_path, images, labels, header=False)
    fr = recordio.FaceRecord(tmp_path)
    assert not fr.has_header and fr.image_keys == [0, 1, 2, 3]
    assert [(k, lab) for k, lab, _ in fr] == [(0, 2), (1, 0), (2, 1), (3, 0)]
    assert [data for *_, data in fr] == images


def test_bad_rec_files_are_named(tmp_path):
    images, labels = [_jpeg(i) for i in range(3)], [0, 1, 2]
    recordio.write_face_record(tmp_path, images, labels, header=False)
    (tmp_path / "property").write_text("2,112,112\n")  # label 2 is out of range now
    bad_label = r"train.rec: record 2 has label 2.0.*\[0, 2\)"
    with pytest.raises(recordio.RecordIOError, match=bad_label):
        list(recordio.FaceRecord(tmp_path))
    (tmp_path / "property").write_text("3,112,112\n5\n")
    with pytest.raises(recordio.RecordIOError, match="property: says 5 images.* holds 3"):
        recordio.FaceRecord(tmp_path)
    (tmp_path / "property").write_text("three,112\n")
    with pytest.raises(recordio.RecordIOError, match="property: expected 'num_classes,H,W'"):
        recordio.FaceRecord(tmp_path)
    (tmp_path / "property").unlink()
    with pytest.raises(FileNotFoundError, match="property file not found"):
        recordio.FaceRecord(tmp_path)
    (tmp_path / "property").write_text("3,112,112\n")
    idx = (tmp_path / "train.idx").read_text()
    (tmp_path / "train.idx").write_text(idx.replace("\t", "\t9999999", 1))
    with pytest.raises(recordio.RecordIOError, match="outside .*train.rec.*do not match"):
        recordio.FaceRecord(tmp_path)
    lines = idx.splitlines()
    (tmp_path / "train.idx").write_text(f"0\t{int(lines[0].split()[1]) + 4}\n")
    with pytest.raises(recordio.RecordIOError, match="record 0 at offset 4: expected magic"):
        recordio.FaceRecord(tmp_path)
    (tmp_path / "train.idx").write_text("")
    with pytest.raises(recordio.RecordIOError, match="train.idx: index is empty"):
        recordio.FaceRecord(tmp_path)
    (tmp_path / "train.idx").write_text(idx)
    rec = (tmp_path / "train.rec").read_bytes()
    (tmp_path / "train.rec").write_bytes(rec[: len(rec) - 100])
    with pytest.raises(recordio.RecordIOError, match=r"record 2 .* \(truncated .rec\)"):
        list(recordio.FaceRecord(tmp_path))
    (tmp_path / "train.rec").write_bytes(b"")
    with pytest.raises(recordio.RecordIOError, match="train.rec: file is empty"):
        recordio.FaceRecord(tmp_path)
    (tmp_path / "train.rec").unlink()
    with pytest.raises(FileNotFoundError, match="train.rec: RecordIO data file not found"):
        recordio.FaceRecord(tmp_path)


def _tfds_examples(root):
    import tensorflow_datasets as tfds

    b = tfds.builder_from_directory(str(builders.find_dataset_dir(root)))
    src = b.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    return [src[i] for i in range(len(src))]


def test_rec_builder_skips_corrupt_and_round_trips(rec_dir, tmp_path, caplog):
    d, images, labels = rec_dir
    with caplog.at_level(logging.WARNING):
        root = builders.prepare("rec", d, tmp_path / "out")
    assert "skipping" in caplog.text and "record" in caplog.text
    summary = builders.inspect_dataset(root)
    assert summary["num_examples"] == len(images) - 2
    assert summary["num_classes"] == 4 and summary["skipped"] == 2
    fr = recordio.FaceRecord(d)
    for ex in _tfds_examples(root):
        label, data = fr.read(int(ex["source_id"]))
        assert ex["image"] == data and ex["label"] == label  # stored bytes are the source bytes
        assert np.array_equal(_decode(ex["image"]), _decode(data))
    bad_keys = {k for k, _, data in fr if data in (images[5], images[7])}
    assert set(summary["metadata"]["skipped_source_ids"]) == bad_keys
    # Idempotent: a second prepare returns at once; different options are refused.
    mtime = (root / builders.MANIFEST).stat().st_mtime_ns
    assert builders.prepare("rec", d, tmp_path / "out") == root
    assert (root / builders.MANIFEST).stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="already holds a dataset"):
        builders.prepare("rec", d, tmp_path / "out", on_size_mismatch="error")


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_folder_builder_flat(tmp_path, caplog):
    src = tmp_path / "faces"
    files = {
        "bob/1.jpg": _jpeg(1),
        "bob/2.png": _jpeg(2, fmt="PNG"),
        "alice/a.jpg": _jpeg(3),
        "alice/b.jpg": _jpeg(4, size=100),
        "carol/x.jpg": b"\xff\xd8garbage",
        "carol/y.jpg": _jpeg(5),
        "carol/notes.txt": b"ignored",
    }
    for name, data in files.items():
        _write(src / name, data)
    with caplog.at_level(logging.WARNING):
        root = builders.prepare("folder", src, tmp_path / "out")
    assert "resizing to 112" in caplog.text
    s = builders.inspect_dataset(root)
    assert (s["num_examples"], s["num_classes"], s["skipped"], s["resized"]) == (5, 3, 1, 1)
    assert (root / "classes.txt").read_text() == "alice\nbob\ncarol\n"
    expected = {"alice": 0, "bob": 1, "carol": 2}
    seen = set()
    for ex in _tfds_examples(root):
        path, label = builders.list_image_folder(src)[1][int(ex["source_id"])]
        name = path.split("faces/")[1]
        assert label == expected[name.split("/")[0]] == ex["label"]
        if name == "alice/b.jpg":  # resized and re-encoded
            assert _decode(ex["image"]).shape == (112, 112, 3)
        else:
            assert ex["image"] == files[name]
            assert np.array_equal(_decode(ex["image"]), _decode(files[name]))
        seen.add(name)
    assert seen == {"bob/1.jpg", "bob/2.png", "alice/a.jpg", "alice/b.jpg", "carol/y.jpg"}
    with pytest.raises(ValueError, match=r"alice/b.jpg \(file 1\) is 100x100, expected 112x112"):
        builders.prepare("folder", src, tmp_path / "out2", on_size_mismatch="error")


def test_folder_builder_webface_split(tmp_path):
    src = tmp_path / "WebFace42M"
    layout = {
        "0/0_0_0000001/0_0.jpg": 1,
        "0/0_0_0000000/0_0.jpg": 0,
        "0/0_0_0000000/0_1.jpg": 0,
        "1/1_0_0000002/0_0.jpg": 2,
        "1/0_9_0000000/0_0.jpg": None,
    }
    for i, name in enumerate(layout):
        _write(src / name, _jpeg(10 + i))
    names, files = builders.list_image_folder(src)
    assert names == ["0_0_0000000", "0_0_0000001", "0_9_0000000", "1_0_0000002"]
    root = builders.prepare("folder", src, tmp_path / "out")
    s = builders.inspect_dataset(root)
    assert (s["num_examples"], s["num_classes"], s["skipped"]) == (5, 4, 0)
    by_bytes = {(src / n).read_bytes(): n for n in layout}
    for ex in _tfds_examples(root):
        name = by_bytes[ex["image"]]
        assert names[ex["label"]] == name.split("/")[1]
    _write(src / "1/0_0_0000001/dup.jpg", _jpeg(99))
    with pytest.raises(ValueError, match="identity '0_0_0000001' appears in"):
        builders.list_image_folder(src)


def test_cli_prepare_and_inspect(rec_dir, tmp_path, capsys):
    from magjax.data.__main__ import main

    d, images, _ = rec_dir
    out = tmp_path / "cli"
    assert main(["prepare", "--format", "rec", "--src", str(d), "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["num_examples"], summary["num_classes"], summary["skipped"]) == (7, 4, 2)
    assert summary["format"] == "rec"
