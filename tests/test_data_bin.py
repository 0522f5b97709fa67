"""Verification .bin files: Python-2 and numpy pickles, writing, and refusing malicious pickles."""

import io
import json
import logging
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from magjax.data import verification_bin as vb


def _jpegs(n: int, size: int = 112) -> list[bytes]:
    rng = np.random.default_rng(n)
    out = []
    for i in range(n):
        yy, xx = np.mgrid[0:size, 0:size] / size
        img = np.stack([np.sin(7 * xx + i), np.cos(3 * yy * (i + 1)), xx], -1)
        img = np.clip(128 + 100 * img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def _decode(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


def _py2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
    """Protocol-2 opcodes as Python 2 writes (list of str, list of bool); str is BINSTRING."""
    out = [b"\x80\x02", b"]", b"("]  # PROTO 2, EMPTY_LIST, MARK
    for b in bins:
        if len(b) < 256:
            out.append(b"U" + bytes([len(b)]) + b)  # SHORT_BINSTRING
        else:
            out.append(b"T" + struct.pack("<I", len(b)) + b)  # BINSTRING
    out += [b"e", b"]", b"("]  # APPENDS, EMPTY_LIST, MARK
    out += [b"\x88" if s else b"\x89" for s in issame]  # NEWTRUE / NEWFALSE
    out += [b"e", b"\x86", b"."]  # APPENDS, TUPLE2, STOP
    return b"".join(out)


def test_python2_bin(tmp_path):
    bins = _jpegs(6)
    # A 7th, short (< 256 bytes) str exercises SHORT_BINSTRING; it breaks the pairing.
    raw = _py2_pickle(bins + [b"short\xff"], [True, False, True])
    with pytest.raises(UnicodeDecodeError):  # what a plain Python 3 load does with these files
        pickle.loads(raw)
    path = tmp_path / "lfw.bin"
    path.write_bytes(_py2_pickle(bins, [True, False, True]))
    images, issame = vb.load_bin(path)
    assert images.shape == (6, 112, 112, 3) and images.dtype == np.uint8
    assert issame.tolist() == [True, False, True]
    for img, b in zip(images, bins, strict=True):
        assert np.array_equal(img, _decode(b))
    (tmp_path / "short.bin").write_bytes(raw)
    with pytest.raises(ValueError, match="7 images for 3 pairs"):
        vb.read_bin(tmp_path / "short.bin")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_array_bin(tmp_path, protocol):
    bins = _jpegs(4)
    arrays = [np.frombuffer(b, np.uint8).copy() for b in bins]  # what cv2.imencode returns
    path = tmp_path / "cfp_fp.bin"
    path.write_bytes(pickle.dumps((arrays, [False, True]), protocol=protocol))
    images, issame = vb.load_bin(path)
    assert issame.tolist() == [False, True]
    for img, b in zip(images, bins, strict=True):
        assert np.array_equal(img, _decode(b))


def test_write_bin_round_trip_and_insightface_compatible(tmp_path):
    bins = _jpegs(4)
    p = vb.write_bin(tmp_path / "mine.bin", bins, [True, False])
    with open(p, "rb") as f:
        plain_bins, plain_issame = pickle.load(f)  # what insightface's verification.py does
    assert plain_bins == bins and plain_issame == [True, False]
    images, issame = vb.load_bin(p)
    assert [np.array_equal(a, _decode(b)) for a, b in zip(images, bins, strict=True)] == [True] * 4
    raw = np.stack([_decode(b) for b in bins])
    vb.write_bin(tmp_path / "arr.bin", raw, np.array([1, 0], bool))
    again, _ = vb.load_bin(tmp_path / "arr.bin")
    assert np.abs(again.astype(int) - raw).mean() < 3  # JPEG q95 of our own encoding
    with pytest.raises(ValueError, match="need exactly 2 per pair"):
        vb.write_bin(tmp_path / "bad.bin", bins, [True])


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_malicious_bin_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Evil(f"touch {marker}")], [True]), protocol=2))
    refused = r"evil.bin: refused to load global '(posix|os)\.system'"
    with pytest.raises(vb.UnsafePickleError, match=refused):
        vb.load_bin(path)
    assert not marker.exists()
    # Globals that look harmless are refused too, and so are non-uint8 arrays.
    path.write_bytes(pickle.dumps(([print], [True])))
    with pytest.raises(vb.UnsafePickleError, match="builtins.print"):
        vb.read_bin(path)
    path.write_bytes(pickle.dumps(([np.zeros(3, np.float64)] * 2, [True]), protocol=4))
    with pytest.raises(vb.UnsafePickleError, match=r"numpy.dtype\('f8'\) refused"):
        vb.read_bin(path)
    path.write_bytes(pickle.dumps(([np.array([{}], dtype=object)] * 2, [True]), protocol=5))
    with pytest.raises(vb.UnsafePickleError, match="refused"):
        vb.read_bin(path)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="evil.bin: not a readable verification .bin"):
        vb.read_bin(path)


def test_resize_warning_and_corrupt_image(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(vb, "_warned_resize", False)
    bins = _jpegs(2, size=96)
    vb.write_bin(tmp_path / "small.bin", bins, [True])
    with caplog.at_level(logging.WARNING):
        images, _ = vb.load_bin(tmp_path / "small.bin")
    assert images.shape == (2, 112, 112, 3)
    assert caplog.text.count("resizing to 112") == 1
    vb.write_bin(tmp_path / "broken.bin", [bins[0], b"\xff\xd8\xff broken"], [False])
    with pytest.raises(ValueError, match=r"broken.bin: image 1 \(pair 0\) cannot be decoded"):
        vb.load_bin(tmp_path / "broken.bin")


def test_inspect_bin_cli(tmp_path, capsys):
    from magjax.data.__main__ import main

    vb.write_bin(tmp_path / "v.bin", _jpegs(6), [True, False, True])
    assert main(["inspect", str(tmp_path / "v.bin"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["num_pairs"], summary["num_same"], summary["num_images"]) == (3, 2, 6)
    assert summary["image_sizes"] == {"112x112": 6} and summary["corrupt_images"] == []
