"""MXNet RecordIO (``train.rec`` / ``train.idx`` / ``property``) as insightface writes it.

Written by hand because the format's only maintained implementation lives inside mxnet, which
magjax does not depend on. The layout (docs/field.md section 3a):

* physical record: ``[u32 magic 0xced7230a][u32 lrec][payload][zero pad to 4 bytes]``, little
  endian, ``lrec = cflag << 29 | length``. A payload that contains the magic at a 4-byte-aligned
  offset is split there by the dmlc writer (the 4 magic bytes are dropped): cflag 1 = first part,
  2 = middle, 3 = last; the reader re-joins the parts by inserting the magic between them.
* ``.idx``: text lines ``key\\toffset`` (offset of the record's first magic), in any order.
* logical payload: IRHeader ``struct 'IfQQ'`` (flag, float label, id, id2); if flag > 0, flag
  float32 labels follow and the label field is 0; then the encoded image.
* record 0 may be a header (flag > 0, label = [first_identity_record_key, end]): images are then
  keys 1 .. label[0]-1. Plain ``im2rec`` files have no header: every key is an image.
* ``property``: ``num_classes,H,W`` on line 1 (optionally ``num_images`` on line 2).
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import pathlib
import reprlib
import struct
from collections.abc import Iterable, Iterator

import numpy as np

from magjax.data import FACE_SIZE
from magjax.errors import UserError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
_IR_FORMAT = struct.Struct("<IfQQ")


class RecordIOError(UserError):
    """A RecordIO file does not have the expected structure (message names file and record)."""


class DamagedRecordError(RecordIOError):
    """One record cannot be read (cut short, bad magic or part flags): the rest may be intact."""


@dataclasses.dataclass(frozen=True)
class IRHeader:
    """insightface / mxnet image record header. ``label`` is a float or a float32 array."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack(header: IRHeader, data: bytes) -> bytes:
    """Serialises a header and image bytes like mxnet's ``recordio.pack``.

    A scalar label is stored in the header (flag 0); an array label sets flag = len(label) and is
    stored as float32 values in front of the data.
    """
    if np.ndim(header.label) == 0:
        return _IR_FORMAT.pack(0, float(header.label), header.id, header.id2) + data
    label = np.asarray(header.label, dtype="<f4").reshape(-1)
    return _IR_FORMAT.pack(len(label), 0.0, header.id, header.id2) + label.tobytes() + data


def unpack(payload: bytes) -> tuple[IRHeader, bytes]:
    """Splits a logical record into its header and image bytes (inverse of :func:`pack`)."""
    if len(payload) < _IR_FORMAT.size:
        raise DamagedRecordError(
            f"record of {len(payload)} bytes is shorter than the 24-byte IRHeader"
        )
    flag, label, id_, id2 = _IR_FORMAT.unpack_from(payload)
    start = _IR_FORMAT.size
    if flag > 0:
        end = start + 4 * flag
        if end > len(payload):
            raise DamagedRecordError(
                f"IRHeader flag {flag} needs {4 * flag} label bytes, record ends"
            )
        label = np.frombuffer(payload, dtype="<f4", count=flag, offset=start).copy()
        start = end
    return IRHeader(flag, label, id_, id2), payload[start:]


def scalar_label(header: IRHeader) -> float:
    """The class label of an image record: the scalar label, or label[0] for an array label."""
    return float(header.label[0]) if np.ndim(header.label) else float(header.label)


class RecordIOWriter:
    """Writes an indexed ``.rec``/``.idx`` pair exactly as dmlc's ``RecordIOWriter`` does.

    Use as a context manager; ``write(key, payload)`` appends one logical record.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike):
        self.rec_path, self.idx_path = pathlib.Path(rec_path), pathlib.Path(idx_path)
        self._rec = open(self.rec_path, "wb")  # noqa: SIM115 (closed in close())
        self._idx = open(self.idx_path, "w")  # noqa: SIM115
        self._pos = 0

    def _part(self, cflag: int, chunk: bytes | memoryview) -> None:
        n = len(chunk)
        pad = (-n) % 4
        self._rec.write(struct.pack("<II", MAGIC, (cflag << 29) | n))
        self._rec.write(chunk)
        self._rec.write(b"\0" * pad)
        self._pos += 8 + n + pad

    def write(self, key: int, payload: bytes) -> None:
        if len(payload) > _LEN_MASK:
            raise RecordIOError(f"record {key} of {len(payload)} bytes exceeds 2^29-1")
        self._idx.write(f"{key}\t{self._pos}\n")
        view = memoryview(payload)
        # Split where the magic sits at a 4-byte-aligned offset (dmlc WriteRecord).
        start = 0
        pos = payload.find(_MAGIC_BYTES)
        while pos != -1:
            if pos % 4 == 0:
                self._part(1 if start == 0 else 2, view[start:pos])
                start = pos + 4
            pos = payload.find(_MAGIC_BYTES, pos + 1)
        self._part(0 if start == 0 else 3, view[start:])

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_index(idx_path: str | os.PathLike) -> dict[int, int]:
    """Reads a ``.idx`` file into {key: byte offset}; errors name the file and the line."""
    idx_path = pathlib.Path(idx_path)
    if not idx_path.is_file():
        raise FileNotFoundError(f"{idx_path}: RecordIO index not found (expected key<TAB>offset)")
    index: dict[int, int] = {}
    # Read as bytes, in lines of at most 256 bytes (a real line has two integers): a binary
    # file (a .rec passed as the .idx, say) is then a bad line naming the file, neither a
    # UnicodeDecodeError nor a file-sized line in memory.
    with open(idx_path, "rb") as f:
        for lineno, raw in enumerate(iter(lambda: f.readline(256), b""), 1):
            line = raw.decode("ascii", errors="replace")
            if not line.strip():
                continue
            parts = line.split()
            try:
                key, offset = int(parts[0]), int(parts[1])
            except (ValueError, IndexError):
                raise RecordIOError(
                    f"{idx_path}:{lineno}: expected 'key<TAB>offset' with integers, got "
                    f"{reprlib.repr(line)}"
                ) from None
            if key in index:
                raise RecordIOError(f"{idx_path}:{lineno}: key {key} appears twice")
            index[key] = offset
    if not index:
        raise RecordIOError(f"{idx_path}: index is empty (expected one key<TAB>offset per record)")
    return index


class RecordIOReader:
    """Random access to the logical records of an indexed ``.rec`` file (memory-mapped)."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike):
        self.rec_path = pathlib.Path(rec_path)
        if not self.rec_path.is_file():
            raise FileNotFoundError(f"{self.rec_path}: RecordIO data file not found")
        self.index = read_index(idx_path)
        size = self.rec_path.stat().st_size
        if size == 0:
            raise RecordIOError(f"{self.rec_path}: file is empty (expected RecordIO records)")
        with open(self.rec_path, "rb") as f:
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        bad = [(k, o) for k, o in self.index.items() if not 0 <= o <= size - 8]
        if bad:
            k, o = bad[0]
            raise RecordIOError(
                f"{idx_path}: key {k} points at offset {o} outside {self.rec_path} ({size} bytes);"
                f" .idx and .rec do not match ({len(bad)} such keys)"
            )
        self._refuse_shared_offsets(idx_path)

    def _refuse_shared_offsets(self, idx_path) -> None:
        """Two keys at one offset would read one record twice (one image trained under two
        keys, or a record whose own key is lost): no writer produces that, so the index is
        corrupt. Refused, naming both keys (numpy sort: no second dict as large as the index)."""
        keys = np.fromiter(self.index.keys(), np.int64, len(self.index))
        offsets = np.fromiter(self.index.values(), np.int64, len(self.index))
        order = np.argsort(offsets, kind="stable")
        same = np.flatnonzero(offsets[order][1:] == offsets[order][:-1])
        if same.size:
            first, second = keys[order[same[0]]], keys[order[same[0] + 1]]
            raise RecordIOError(
                f"{idx_path}: keys {first} and {second} both point at offset "
                f"{offsets[order[same[0]]]} ({same.size} such duplicates): a corrupt index, as no "
                "two records can start at one offset"
            )

    def keys(self) -> list[int]:
        return sorted(self.index)

    def read_at(self, offset: int, key: int | None = None) -> bytes:
        """Reads the logical record starting at ``offset``, re-joining multi-part records."""
        buf, parts, pos = self._buf, [], offset
        while True:
            if pos + 8 > len(buf):
                raise DamagedRecordError(f"{self.rec_path}: record {key} truncated at offset {pos}")
            magic, lrec = struct.unpack_from("<II", buf, pos)
            if magic != MAGIC:
                raise DamagedRecordError(
                    f"{self.rec_path}: record {key} at offset {pos}: expected magic 0xced7230a, "
                    f"got {magic:#010x} (wrong .idx for this .rec, or a corrupt file)"
                )
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            if pos + 8 + length > len(buf):
                raise DamagedRecordError(
                    f"{self.rec_path}: record {key} at offset {pos} claims {length} bytes, "
                    "file ends first (truncated .rec)"
                )
            parts.append(buf[pos + 8 : pos + 8 + length])
            pos += 8 + length + (-length) % 4
            if cflag == 0 and len(parts) == 1:
                return parts[0]
            if cflag == 3:
                return _MAGIC_BYTES.join(parts)
            expected = (1,) if len(parts) == 1 else (2, 3)
            if cflag not in expected:
                raise DamagedRecordError(
                    f"{self.rec_path}: record {key} at offset {pos}: part {len(parts)} has cflag "
                    f"{cflag}, expected one of {expected}"
                )

    def read(self, key: int) -> bytes:
        if key not in self.index:
            raise KeyError(f"{self.rec_path}: no record with key {key}")
        return self.read_at(self.index[key], key)

    def close(self) -> None:
        self._buf.close()


@dataclasses.dataclass(frozen=True)
class Property:
    """Contents of an insightface ``property`` file."""

    num_classes: int
    height: int
    width: int
    num_images: int | None = None


def read_property(path: str | os.PathLike) -> Property:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: property file not found (expected 'num_classes,H,W')")
    try:
        text = path.read_bytes().decode("ascii")
    except UnicodeDecodeError as e:
        raise RecordIOError(
            f"{path}: not a text file (byte {e.object[e.start]:#04x} at offset {e.start}); "
            "expected 'num_classes,H,W' on line 1"
        ) from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    try:
        c, h, w = (int(v) for v in lines[0].split(","))
        n = int(lines[1]) if len(lines) > 1 else None
    except (ValueError, IndexError):
        raise RecordIOError(
            f"{path}: expected 'num_classes,H,W' on line 1 (and optionally num_images on line 2), "
            f"got {lines[:2]!r}"
        ) from None
    if c <= 0 or h <= 0 or w <= 0:
        raise RecordIOError(f"{path}: num_classes, H and W must be positive, got {c},{h},{w}")
    return Property(c, h, w, n)


def write_property(path: str | os.PathLike, prop: Property) -> None:
    text = f"{prop.num_classes},{prop.height},{prop.width}\n"
    if prop.num_images is not None:
        text += f"{prop.num_images}\n"
    pathlib.Path(path).write_text(text)


class FaceRecord:
    """An insightface face data set directory: ``train.rec``, ``train.idx`` and ``property``.

    Iterating yields ``(key, label, image_bytes)`` for every image record: keys 1 .. label[0]-1
    when record 0 is a header (flag > 0), otherwise every key of the index (plain im2rec).
    Labels are checked against [0, num_classes) and a bad one is an error naming the record.
    """

    def __init__(self, directory: str | os.PathLike, prefix: str = "train"):
        self.dir = pathlib.Path(directory)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"{self.dir}: RecordIO directory not found")
        rec, idx = self.dir / f"{prefix}.rec", self.dir / f"{prefix}.idx"
        self.property = read_property(self.dir / "property")
        self.reader = RecordIOReader(rec, idx)
        self.num_classes = self.property.num_classes
        first = self.reader.index.get(0)
        header = unpack(self.reader.read_at(first, 0))[0] if first is not None else None
        if header is not None and header.flag > 0:
            end = self._header_image_end(header, rec, idx)
            # Bounded above by the index's size, so building the list allocates what the
            # .idx backs; the first missing key is found without listing the others.
            missing = next((k for k in range(1, end) if k not in self.reader.index), None)
            if missing is not None:
                count = sum(k not in self.reader.index for k in range(1, end))
                raise RecordIOError(
                    f"{idx}: header record 0 announces image keys 1..{end - 1}, "
                    f"but {count} are missing from the index (first: {missing})"
                )
            self.image_keys = list(range(1, end))
            self.has_header = True
        else:
            self.image_keys = self.reader.keys()
            self.has_header = False
        n = self.property.num_images
        if n is not None and n != len(self.image_keys):
            raise RecordIOError(
                f"{self.dir / 'property'}: says {n} images, {rec} holds {len(self.image_keys)}"
            )

    def _header_image_end(self, header: IRHeader, rec: pathlib.Path, idx: pathlib.Path) -> int:
        """``label[0]`` of header record 0 (images are keys 1 .. label[0]-1), checked before
        anything is allocated for it: a whole number, at least 1, announcing no more image keys
        than the index holds; ``label[1]`` (end of the identity records), where present, a
        whole number not below ``label[0]``. Errors name the field and the files."""
        labels = np.atleast_1d(np.asarray(header.label, np.float64))
        names = (
            "label[0] (first identity record, images are keys 1 .. label[0]-1)",
            "label[1] (end of the identity records)",
        )
        for field, value in zip(names, labels[:2], strict=False):
            if not (math.isfinite(value) and value == int(value) and value >= 1):
                raise RecordIOError(
                    f"{rec}: header record 0 {field} is {value:g}, expected a "
                    "whole number >= 1 (a corrupt header)"
                )
        end = int(labels[0])
        if len(labels) > 1 and labels[1] < end:
            raise RecordIOError(
                f"{rec}: header record 0 label[1] ends the identity records "
                f"[{end}, {int(labels[1])}) before label[0] starts them"
            )
        if end - 1 > len(self.reader.index) - 1:
            raise RecordIOError(
                f"{rec}: header record 0 label[0] announces {end - 1} image records (keys 1.."
                f"{end - 1}), but {idx} holds only {len(self.reader.index)} keys in all "
                "(a corrupt header, or the wrong .idx)"
            )
        return end

    def __len__(self) -> int:
        return len(self.image_keys)

    def read(self, key: int) -> tuple[int, bytes]:
        """Returns (label, image bytes) of one image record, validating the label.

        Raises :class:`DamagedRecordError` for a record that cannot be read (the others may be
        intact) and :class:`RecordIOError` for a label outside the property's classes.
        """
        payload = self.reader.read(key)
        try:
            header, data = unpack(payload)
        except DamagedRecordError as e:
            raise DamagedRecordError(f"{self.reader.rec_path}: record {key}: {e}") from None
        label = scalar_label(header)
        if not (math.isfinite(label) and label == int(label) and 0 <= label < self.num_classes):
            raise RecordIOError(
                f"{self.reader.rec_path}: record {key} has label {label}, expected an integer in "
                f"[0, {self.num_classes}) (num_classes from {self.dir / 'property'})"
            )
        return int(label), data

    def __iter__(self) -> Iterator[tuple[int, int, bytes]]:
        for key in self.image_keys:
            yield (key, *self.read(key))


def write_face_record(
    directory: str | os.PathLike,
    images: Iterable[bytes],
    labels: Iterable[int],
    *,
    num_classes: int | None = None,
    image_size: tuple[int, int] = (FACE_SIZE, FACE_SIZE),
    header: bool = True,
    label_as_array: bool = False,
) -> pathlib.Path:
    """Writes ``train.rec``/``train.idx``/``property`` for encoded images and class labels.

    ``header=True`` writes the face2rec2/RecBuilder layout: header record 0, images 1..N (sorted
    by label, as identity ranges require) and one identity record per class with its
    [start, end) image keys. ``header=False`` writes plain im2rec records 0..N-1 in the given
    order. ``label_as_array=True`` stores labels as [label, 1.0] (flag 2), as face2rec2 does.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    images, labels = list(images), [int(v) for v in labels]
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    c = num_classes if num_classes is not None else max(labels) + 1
    n = len(images)

    def image_header(key: int, label: int) -> IRHeader:
        lab = np.array([label, 1.0], np.float32) if label_as_array else float(label)
        return IRHeader(0, lab, key, 0)

    with RecordIOWriter(directory / "train.rec", directory / "train.idx") as w:
        if not header:
            for key, (img, lab) in enumerate(zip(images, labels, strict=True)):
                w.write(key, pack(image_header(key, lab), img))
        else:
            order = sorted(range(n), key=lambda i: labels[i])
            w.write(0, pack(IRHeader(0, np.array([n + 1, n + 1 + c], np.float32), 0, 1), b""))
            starts: dict[int, list[int]] = {}
            for key, i in enumerate(order, 1):
                w.write(key, pack(image_header(key, labels[i]), images[i]))
                starts.setdefault(labels[i], [key, key])[1] = key + 1
            for cls in range(c):
                lo, hi = starts.get(cls, [0, 0])
                rng_label = np.array([lo, hi], np.float32)
                w.write(n + 1 + cls, pack(IRHeader(0, rng_label, n + 1 + cls, 0), b""))
    write_property(directory / "property", Property(c, image_size[0], image_size[1], n))
    return directory
