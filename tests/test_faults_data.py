"""Faults in data and model files (issue 29): each is refused in one line naming the file and
field, or read as what it holds; none allocates what the file cannot back or fails after the
work is done."""

import io
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from magjax.data import augment, builders, images, recordio, verification_bin
from magjax.errors import UserError

# ------------------------------------------------------------------------------------------
# Images wider than 8 bits, with alpha, palettes, CMYK or an EXIF orientation.


def _grey(size: int = 112) -> np.ndarray:
    """An 8-bit grey picture using every level 0..255 (so scaling errors show)."""
    yy, xx = np.mgrid[0:size, 0:size]
    return ((xx * 7 + yy * 3) % 256).astype(np.uint8)


def _colour(size: int = 112) -> np.ndarray:
    g = _grey(size)
    return np.stack([g, 255 - g, (g.astype(np.int32) * 3 % 256).astype(np.uint8)], -1)


def _encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png16(array16: np.ndarray) -> bytes:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA by the channel count), written by hand:
    Pillow cannot write 16 bits per channel with more than one channel."""
    h, w = array16.shape[:2]
    channels = 1 if array16.ndim == 2 else array16.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = array16.astype(">u2").reshape(h, w * channels)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _wide_images() -> dict[str, tuple[bytes, np.ndarray]]:
    """Encoded images in unusual modes -> (bytes, the 8-bit RGB picture they show)."""
    g, rgb = _grey(), _colour()
    grey_rgb = np.repeat(g[..., None], 3, -1)
    alpha = np.tile(np.arange(112, dtype=np.uint8)[None] * 2, (112, 1))
    wide = g.astype(np.uint16) * 257
    palette = Image.fromarray(rgb).quantize(64)
    cases = {
        "I;16 png": (_encode(Image.fromarray(wide), "PNG"), grey_rgb),
        "I;16B tiff": (
            _encode(Image.frombytes("I;16B", (112, 112), wide.astype(">u2").tobytes()), "TIFF"),
            grey_rgb,
        ),
        "I tiff": (_encode(Image.fromarray(wide.astype(np.int32)), "TIFF"), grey_rgb),
        "F tiff": (_encode(Image.fromarray(g.astype(np.float32) / 255), "TIFF"), grey_rgb),
        "LA png": (_encode(Image.fromarray(np.stack([g, alpha], -1)), "PNG"), grey_rgb),
        "RGBA png": (_encode(Image.fromarray(np.dstack([rgb, alpha])), "PNG"), rgb),
        "P transparency index": (
            _encode(palette, "PNG", transparency=0),
            np.asarray(palette.convert("RGB")),
        ),
        "P transparency bytes": (
            _encode(palette, "PNG", transparency=bytes(range(0, 256, 4))),
            np.asarray(palette.convert("RGB")),
        ),
        "CMYK tiff": (_encode(Image.fromarray(rgb).convert("CMYK"), "TIFF"), rgb),
        "16-bit grey png (hand-written)": (_png16(wide), grey_rgb),
        "16-bit grey+alpha png": (
            _png16(np.stack([wide, alpha.astype(np.uint16) * 257], -1)),
            grey_rgb,
        ),
        "16-bit RGB png": (_png16(rgb.astype(np.uint16) * 257), rgb),
        "16-bit RGBA png": (_png16(np.dstack([rgb, alpha]).astype(np.uint16) * 257), rgb),
    }
    return cases


WIDE = _wide_images()


@pytest.mark.parametrize("case", sorted(WIDE))
def test_wide_and_unusual_modes_read_as_their_8_bit_picture(case, tmp_path):
    data, expected = WIDE[case]
    # Every decode site: prepare's check, training's decode, .bin sets, extract's read_face.
    path = tmp_path / "face.img"
    path.write_bytes(data)
    got = {
        "decode_rgb": np.asarray(images.decode_rgb(data, "x")),
        "training": augment.augment_image(data, "none", None),
        ".bin": verification_bin.decode_image(data, what="x"),
        "extract": images.read_face(path),
    }
    for site, pixels in got.items():
        assert pixels.dtype == np.uint8 and pixels.shape == (112, 112, 3), site
        diff = np.abs(pixels.astype(int) - expected.astype(int)).max()
        assert diff <= 1, f"{case} via {site}: max difference {diff} grey levels"


def test_ijb_reads_a_16_bit_loose_crop_as_its_picture(tmp_path):
    from magjax.eval import align, ijb

    data, expected = WIDE["I;16 png"]
    (tmp_path / "crop.png").write_bytes(data)
    # The template's own landmarks: the warp is the identity up to interpolation.
    got = ijb.load_aligned(tmp_path / "crop.png", np.asarray(align.ARCFACE_TEMPLATE))
    assert np.abs(got.astype(int) - expected.astype(int)).mean() < 2


def test_exif_orientation_is_applied_as_cv2_does():
    picture = np.zeros((40, 60, 3), np.uint8)
    picture[:10, :20] = 255  # a white block at the top left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    shown = np.rot90(picture, k=-1)  # 60x40, the block now at the top right
    for fmt in ("PNG", "JPEG", "TIFF"):  # EXIF in a PNG chunk, a JPEG APP1, TIFF tags
        data = _encode(Image.fromarray(picture), fmt, exif=exif)
        got = np.asarray(images.decode_rgb(data, "x")).astype(int)
        assert got.shape == shown.shape and np.abs(got - shown).mean() < 3, fmt
        # Training resizes a non-112 image after orienting it, like every other reader.
        trained = np.asarray(augment.decode(data, 112))
        assert trained[:20, -20:].mean() > 200 and trained[:20, :20].max() < 60, fmt


# ------------------------------------------------------------------------------------------
# RecordIO: what a tiny file declares is bounded by what it holds.


def _header_rec(directory, header_label, images: int = 3):
    """A .rec whose header record 0 has ``header_label``, then ``images`` image records."""
    directory.mkdir(parents=True, exist_ok=True)
    with recordio.RecordIOWriter(directory / "train.rec", directory / "train.idx") as w:
        w.write(
            0, recordio.pack(recordio.IRHeader(0, np.array(header_label, np.float32), 0, 0), b"")
        )
        for key in range(1, images + 1):
            w.write(key, recordio.pack(recordio.IRHeader(0, 0.0, key, 0), b"img"))
    recordio.write_property(directory / "property", recordio.Property(1, 112, 112))
    return directory


_BOUNDED_READER = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 31, 1 << 31))  # 2 GiB: a list of 3e9 keys is 84 GB
from magjax.data import recordio
try:
    recordio.FaceRecord(sys.argv[1])
except recordio.RecordIOError as e:
    print("error:", e)
"""


def test_huge_header_range_is_refused_before_allocating(tmp_path):
    directory = _header_rec(tmp_path / "huge", [3e9, 3e9 + 2])
    assert (directory / "train.rec").stat().st_size < 200
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _BOUNDED_READER, str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert time.monotonic() - started < 30
    line = done.stdout.strip()
    assert line.count("\n") == 0 and "header record 0 label[0] announces 2999999999 image" in line
    assert "train.idx holds only 4 keys" in line


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ([float("nan"), 5.0], r"label\[0\] .* is nan, expected a whole number >= 1"),
        ([-7.0, 5.0], r"label\[0\] .* is -7, expected a whole number >= 1"),
        ([2.5, 5.0], r"label\[0\] .* is 2.5, expected"),
        ([4.0, float("inf")], r"label\[1\] \(end of the identity records\) is inf"),
        ([4.0, 2.0], r"label\[1\] ends the identity records \[4, 2\) before label\[0\]"),
    ],
)
def test_bad_header_range_is_one_line_naming_the_field(tmp_path, label, message):
    directory = _header_rec(tmp_path / "bad", label)
    with pytest.raises(recordio.RecordIOError, match=f"train.rec: header record 0 {message}"):
        recordio.FaceRecord(directory)


def test_header_range_within_the_index_still_reads(tmp_path):
    fr = recordio.FaceRecord(_header_rec(tmp_path / "ok", [3.0, 4.0]))
    assert fr.image_keys == [1, 2] and fr.has_header


def test_two_index_keys_at_one_offset_are_refused(tmp_path):
    directory = _header_rec(tmp_path / "dup", [4.0, 4.0])
    lines = (directory / "train.idx").read_text().splitlines()
    offset_of_2 = lines[2].split("\t")[1]
    lines[3] = f"3\t{offset_of_2}"  # key 3 now reads key 2's record
    (directory / "train.idx").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        recordio.RecordIOError,
        match=f"train.idx: keys 2 and 3 both point at offset {offset_of_2} "
        r"\(1 such duplicates\): a corrupt index",
    ):
        recordio.FaceRecord(directory)


def test_binary_property_and_index_files_are_one_line(tmp_path):
    directory = _header_rec(tmp_path / "bin", [4.0, 4.0])
    (directory / "property").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" + bytes(range(256)))
    with pytest.raises(
        recordio.RecordIOError, match=r"property: not a text file \(byte 0x89 at offset 0\)"
    ):
        recordio.FaceRecord(directory)
    recordio.write_property(directory / "property", recordio.Property(1, 112, 112))
    (directory / "train.idx").write_bytes(b"\xff\xfe\x00" * 100_000)  # no line break at all
    with pytest.raises(recordio.RecordIOError, match=r"train.idx:1: expected 'key<TAB>offset'"):
        recordio.FaceRecord(directory)


# ------------------------------------------------------------------------------------------
# Image folders: odd names, link loops and classes left without images.


def _face_png(seed: int, size: int = 112) -> bytes:
    rng = np.random.default_rng(seed)
    return _encode(Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)), "PNG")


def test_folder_with_a_non_utf8_name_builds_and_says_which_class_has_no_image(tmp_path, caplog):
    src = tmp_path / "faces"
    odd = os.fsencode(src) + b"/caf\xe9-\xff"  # Latin-1 bytes: not valid UTF-8
    os.makedirs(odd)
    for name in ("ann", "bob"):
        (src / name).mkdir()
    with open(odd + b"/1.png", "wb") as f:
        f.write(_face_png(1))
    (src / "ann" / "1.png").write_bytes(_face_png(2))
    (src / "bob" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # bob's only image
    # A 16-bit grey picture that is not 112x112: resized and re-encoded by prepare.
    grey = _grey(100)
    (src / "ann" / "wide.png").write_bytes(
        _encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG")
    )
    with caplog.at_level(logging.WARNING):
        root = builders.prepare("folder", src, tmp_path / "out")
    names = os.fsdecode(odd).rsplit("/", 1)[1]
    # classes.txt keeps the folder names' bytes, label order = sorted names.
    assert (root / "classes.txt").read_bytes() == b"ann\nbob\ncaf\xe9-\xff\n"
    assert (root / "classes.txt").read_text(errors="surrogateescape").splitlines()[2] == names
    assert "not valid UTF-8" in caplog.text and ascii(names) in caplog.text
    assert "1 of 3 classes have no readable image" in caplog.text and "'bob'" in caplog.text
    summary = builders.inspect_dataset(root)
    assert (summary["num_examples"], summary["num_classes"], summary["skipped"]) == (3, 3, 1)
    assert summary["metadata"]["classes_without_images"] == 1
    resized = [
        ex["image"]
        for ex in _tfds_examples(root)
        if ex["label"] == 0 and ex["image"] != _face_png(2)
    ]
    expected = np.asarray(Image.fromarray(grey).resize((112, 112), Image.BILINEAR))
    got = np.asarray(Image.open(io.BytesIO(resized[0])).convert("L")).astype(int)
    assert np.abs(got - expected).mean() < 3  # JPEG-re-encoded, not white


def _tfds_examples(root):
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(builders.find_dataset_dir(root)))
    source = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    return [source[i] for i in range(len(source))]


@pytest.mark.parametrize("loop", ["identity", "image"])
def test_symlink_loop_in_an_image_folder_is_one_line(tmp_path, capsys, loop):
    from magjax.data.__main__ import main

    src = tmp_path / "faces"
    (src / "ann").mkdir(parents=True)
    (src / "ann" / "1.png").write_bytes(_face_png(1))
    link = src / "loop" if loop == "identity" else src / "ann" / "x.jpg"
    link.symlink_to(link.name)
    assert (
        main(["prepare", "--format", "folder", "--src", str(src), "--out", str(tmp_path / "out")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {link}: cannot be followed: Too many levels of symbolic links; remove or fix it"
    )
    assert not (tmp_path / "out" / builders.MANIFEST).exists()


def test_extract_names_a_looping_image_link(tmp_path):
    from magjax import extract

    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "1.png").write_bytes(_face_png(1))
    (tmp_path / "ann" / "x.jpg").symlink_to("x.jpg")
    (tmp_path / "d").symlink_to(".")  # a directory loop: listed once, not followed
    paths = images.list_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["ann/1.png", "ann/x.jpg"]
    with pytest.raises(
        images.UnreadableImageError,
        match="x.jpg: cannot read image file: Too many levels of symbolic links",
    ):
        list(extract.iter_batches(paths, 4, False, []))
    skipped = []
    batches = list(extract.iter_batches(paths, 4, True, skipped))
    assert [names for names, _ in batches] == [[str(paths[0])]] and skipped == [str(paths[1])]


# ------------------------------------------------------------------------------------------
# Model files: invalid weights, cut-short variables, unknown formats.


@pytest.fixture(scope="module")
def iresnet18_state():
    torch = pytest.importorskip("torch")
    from magjax.models import torch_reference

    torch.manual_seed(0)
    module = torch_reference.build_torch("iresnet18")
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "layer2.0.conv1.weight",
            float("nan"),
            r"tensor 'layer2.0.conv1.weight' holds 1 non-finite",
        ),
        ("features.bias", float("inf"), r"tensor 'features.bias' holds 1 non-finite"),
        (
            "layer1.0.bn2.running_var",
            -0.5,
            r"BatchNorm variance 'layer1.0.bn2.running_var' holds 1 negative values "
            r"\(minimum -0.5\)",
        ),
    ],
)
def test_convert_refuses_invalid_weights_naming_the_tensor(
    tmp_path, capsys, iresnet18_state, key, value, message
):
    import torch

    from magjax import convert

    state = dict(iresnet18_state)
    state[key] = state[key].clone()
    state[key].view(-1)[3] = value
    torch.save(state, tmp_path / "backbone.pth")
    out = tmp_path / "out"
    assert (
        convert.main(
            [
                "--from",
                "arcface_torch",
                str(tmp_path / "backbone.pth"),
                "--arch",
                "iresnet18",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: {tmp_path / 'backbone.pth'}: ")
    assert re.search(message, err), err
    assert not (out / "model.json").exists()


def test_transposed_linear_weight_is_the_one_tensor_named(iresnet18_state):
    from magjax import convert

    state = {k: v.numpy() for k, v in iresnet18_state.items() if "num_batches" not in k}
    state["fc.weight"] = state["fc.weight"].T
    with pytest.raises(convert.ConversionError) as info:
        convert.convert_state_dict(state, "iresnet18")
    assert str(info.value) == (
        "checkpoint does not match arch 'iresnet18' (1 mis-shaped tensors): tensor 'fc.weight' "
        "has shape (25088, 512), expected (512, 25088) (transposed?)"
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A saved 'tiny' inference model (NumPy-filled: no initialiser compiles)."""
    import jax

    from magjax import checkpoint, models

    variables = jax.tree.map(
        lambda s: np.full(s.shape, 0.01, s.dtype), models.abstract_variables("tiny")
    )
    directory = tmp_path_factory.mktemp("tiny") / "model"
    checkpoint.save_inference_model(directory, variables, models.inference_meta("tiny", 512))
    return directory, variables


def _copy_model(tiny_model, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(tiny_model[0], directory)
    return directory


def test_model_json_has_a_format_and_an_unknown_one_is_refused(tiny_model, tmp_path):
    from magjax import checkpoint
    from magjax.encoder import FaceEncoder

    directory = _copy_model(tiny_model, tmp_path)
    meta = json.loads((directory / "model.json").read_text())
    assert meta["format"] == "magjax-model/1"
    (directory / "model.json").write_text(json.dumps({**meta, "format": "magjax-model/2"}))
    with pytest.raises(
        UserError,
        match=r"model.json: format 'magjax-model/2', but this magjax "
        r"reads 'magjax-model/1' only",
    ):
        FaceEncoder.load(directory)
    del meta["format"]  # written by a magjax before the key existed: still loads
    (directory / "model.json").write_text(json.dumps(meta))
    variables, loaded = checkpoint.load_inference_model(directory)
    assert loaded["arch"] == "tiny" and "format" not in loaded
    assert np.array_equal(
        np.asarray(variables["params"]["conv1"]["kernel"]),
        tiny_model[1]["params"]["conv1"]["kernel"],
    )


def test_cut_short_model_variables_are_one_line_on_export(tiny_model, tmp_path, capsys):
    from magjax import export

    directory = _copy_model(tiny_model, tmp_path)
    for name in ("_METADATA", "manifest.ocdbt"):
        data = (directory / "variables" / name).read_bytes()
        (directory / "variables" / name).write_bytes(data[: len(data) // 2])
    assert export.main(["--workdir", str(directory), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"error: {directory / 'variables'}: cannot be read (")
    assert err.endswith(
        "the model files are damaged or incomplete (cut short, or a copy still "
        "in progress); export or convert the model again"
    )
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    ("leaf", "value", "message"),
    [
        (("params", "conv1", "kernel"), float("nan"), "'params/conv1/kernel' holds 1 non-finite"),
        (("batch_stats", "bn1", "var"), -1.0, "variance 'batch_stats/bn1/var' holds 1 negative"),
    ],
)
def test_face_encoder_refuses_invalid_saved_weights(tiny_model, tmp_path, leaf, value, message):
    import jax

    from magjax import checkpoint
    from magjax.encoder import FaceEncoder

    variables = jax.tree.map(np.array, tiny_model[1])
    target = variables
    for key in leaf:
        target = target[key]
    target.reshape(-1)[0] = value
    directory = tmp_path / "model"
    checkpoint.save_inference_model(
        directory,
        variables,
        {"arch": "tiny", "input_spec": {"channel_order": "RGB", "mean": 0.5, "std": 0.5}},
    )
    with pytest.raises(UserError, match=re.escape(f"{directory / 'variables'}: ") + ".*" + message):
        FaceEncoder.load(directory)


# ------------------------------------------------------------------------------------------
# Config: what refuses NaN refuses infinity.


def test_every_field_that_refuses_nan_refuses_infinity():
    from magjax import config_check, recipes

    def problems_with(field, value):
        config = recipes.get_config("magface", "tiny")
        *parents, leaf = field.split(".")
        node = config
        for part in parents:
            node = node[part]
        try:
            node[leaf] = value
        except TypeError:  # an int or str field: ml_collections refuses a float itself
            return None
        return config_check.problems(config)

    checked = []
    for field, _, _ in config_check._RULES:
        if not problems_with(field, float("nan")):
            continue  # a field that takes no float (ml_collections refuses one)
        for value in (float("inf"), float("-inf")):
            found = problems_with(field, value)
            assert any(p.startswith(f"config.{field} must be") for p in found), (field, value)
        checked.append(field)
    assert {"optim.lr", "loss.s", "epochs", "optim.weight_decay", "head.sample_rate"} <= set(
        checked
    )
    # Float fields without a range rule (loss margins) are refused too.
    assert problems_with("loss.l_m", float("inf")) == [
        "config.loss.l_m must be a finite number, got inf"
    ]
    assert problems_with("loss.u_a", float("nan")) == [
        "config.loss.u_a must be a finite number, got nan"
    ]


# ------------------------------------------------------------------------------------------
# Evaluation sets: .bin protocol, IJB meta files, evaluate's messages.


def _pngs(count: int) -> list[bytes]:
    """Distinct small encoded faces (a pickle memoises one bytes object used twice)."""
    return [_face_png(i, size=16) for i in range(count)]


@pytest.mark.parametrize(
    ("issame", "message"),
    [
        ([True, False] * 3, r"holds 6 pairs; the 10-fold verification protocol needs at least 10"),
        ([True] * 12, r"holds no different-identity pair \(issame is True for all 12 pairs\)"),
        ([False] * 12, r"holds no same-identity pair \(issame is False for all 12 pairs\)"),
        (
            [False, False] + [True] * 18,
            r"all its different-identity pairs lie in one of the 10 fold",
        ),
    ],
)
def test_bin_the_10_fold_protocol_cannot_use_is_refused_and_flagged(
    tmp_path, caplog, issame, message
):
    from magjax import evaluators
    from magjax.data.__main__ import main

    path = tmp_path / "set.bin"
    verification_bin.write_bin(path, _pngs(2 * len(issame)), issame)
    with pytest.raises(UserError, match=re.escape(str(path)) + ": " + message):
        evaluators.Verification([path]).load(path)
    with caplog.at_level(logging.WARNING):
        summary = verification_bin.inspect_bin(path)
    assert re.search(message, summary["protocol_problem"]) and re.search(message, caplog.text)
    assert main(["inspect", str(path), "--json"]) == 0  # inspect reports, it does not refuse
    good = tmp_path / "good.bin"
    verification_bin.write_bin(good, _pngs(20), [True, False] * 5)
    assert verification_bin.inspect_bin(good)["protocol_problem"] is None
    assert evaluators.Verification([good]).load(good)[1].tolist() == [True, False] * 5


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_bin_with_a_bool_array_issame_reads_like_a_list(tmp_path, protocol):
    import pickle

    issame = np.array([True, False, True], bool)
    path = tmp_path / "arr.bin"
    path.write_bytes(pickle.dumps((_pngs(6), issame), protocol=protocol))
    images, got = verification_bin.load_bin(path, image_size=16)
    assert got.dtype == bool and got.tolist() == [True, False, True] and images.shape[0] == 6
    path.write_bytes(pickle.dumps((_pngs(6), issame.astype(np.float64)), protocol=protocol))
    with pytest.raises(UserError, match=re.escape(str(path)) + ": .*'f8'.*bool issame"):
        verification_bin.read_bin(path)


def _ijb_meta(root, pairs_text: str, tid_mid_text: str = "a.jpg 1 1\nb.jpg 2 2\n"):
    meta = root / "IJBC" / "meta"
    meta.mkdir(parents=True)
    (meta / "ijbc_face_tid_mid.txt").write_text(tid_mid_text)
    points = " ".join(["50"] * 10)
    (meta / "ijbc_name_5pts_score.txt").write_text(f"a.jpg {points} 0.9\nb.jpg {points} 0.8\n")
    (meta / "ijbc_template_pair_label.txt").write_text(pairs_text)
    return meta


def test_ijb_meta_file_missing_a_column_is_named(tmp_path):
    from magjax.eval import ijb

    # Three lines of "t1 t2": six numbers, which read as two rows of three blamed the labels.
    meta = _ijb_meta(tmp_path / "pairs", "1 2\n1 1\n2 2\n")
    with pytest.raises(
        UserError,
        match=re.escape(
            f"{meta / 'ijbc_template_pair_label.txt'}:1: "
            "expected 't1 t2 label', got 2 fields: '1 2'"
        ),
    ):
        ijb.load_meta(tmp_path / "pairs", "IJBC")
    meta = _ijb_meta(tmp_path / "tid", "1 2 0\n1 1 1\n", tid_mid_text="a.jpg 1 1\nb.jpg 2\n")
    with pytest.raises(
        UserError,
        match=re.escape(
            f"{meta / 'ijbc_face_tid_mid.txt'}:2: expected 'img_name template_id media_id'"
        ),
    ):
        ijb.load_meta(tmp_path / "tid", "IJBC")
    meta = _ijb_meta(tmp_path / "one", "1 2 1\n1 1 1\n")
    with pytest.raises(
        UserError,
        match=re.escape(f"{meta / 'ijbc_template_pair_label.txt'}: TAR@FAR needs genuine"),
    ):
        ijb.load_meta(tmp_path / "one", "IJBC")
    _ijb_meta(tmp_path / "ok", "1 2 0\n\n1 1 1\n")
    assert ijb.load_meta(tmp_path / "ok", "IJBC").labels.tolist() == [0, 1]


def test_evaluate_names_each_failed_file_once_in_one_line(tiny_model, tmp_path, capsys):
    from magjax import evaluate

    missing, small = tmp_path / "gone.bin", tmp_path / "small.bin"
    verification_bin.write_bin(small, _pngs(8), [True, False] * 2)
    status = evaluate.main(
        [
            "--workdir",
            str(tiny_model[0]),
            "--bins",
            f"{missing},{small}",
            "--out",
            str(tmp_path / "eval"),
            "--no-progress",
        ]
    )
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: 2 of 2 .bin sets failed")
    assert err.count(str(missing)) == 1 and err.count(str(small)) == 1, err
    assert f"{missing}: verification .bin not found" in err
    assert f"{small}: holds 4 pairs; the 10-fold verification protocol needs at least 10" in err
    meta = _ijb_meta(tmp_path / "ijb", "1 2\n1 1\n2 2\n")
    assert (
        evaluate.main(
            [
                "--workdir",
                str(tiny_model[0]),
                "--ijb",
                str(tmp_path / "ijb"),
                "--out",
                str(tmp_path / "eval2"),
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"error: {meta / 'ijbc_template_pair_label.txt'}:1: expected 't1 t2 "
        "label', got 2 fields: '1 2'"
    )
