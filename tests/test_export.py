"""python -m magjax.export: onnxruntime equals the JAX forward for every architecture family,
insightface loads the file and reproduces FaceEncoder.encode in all three input conventions (and
fails with the wrong one), and the official PyTorch layouts round-trip bit for bit."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from magjax import checkpoint, convert, export, models
from magjax.encoder import FaceEncoder

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def random_variables(arch, seed=0):
    """Random variables of ``arch`` filled with NumPy (``module.init`` compiles every initialiser
    op by op). Scales and PReLU slopes are random; the BatchNorm statistics are those of a batch
    of random faces (see :func:`calibrated`), so that the embedding depends on the face (with
    arbitrary statistics a deep net's output is nearly constant and any export would match)."""
    module = models.build(arch)
    shapes = jax.eval_shape(
        lambda k: module.init(k, jnp.zeros((1, *models.INPUT_SHAPE)), train=False),
        jax.random.key(0),
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if leaf.ndim >= 2:
            return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape)
        if "var" in name:
            return np.ones(leaf.shape)
        if "mean" in name or "bias" in name:
            return 0.1 * rng.normal(size=leaf.shape)
        return 1.0 + 0.2 * rng.normal(size=leaf.shape)  # BatchNorm scale, PReLU slope

    variables = jax.tree_util.tree_map_with_path(lambda p, x: fill(p, x).astype(np.float32), shapes)
    return calibrated(arch, variables, rng)


def calibrated(arch, variables, rng):
    """``variables`` with every BatchNorm's running mean and variance set to the statistics of
    its input on 16 random faces, each layer normalising with those statistics (what one
    training-mode pass would measure), shifted by a random 10 % so that the mean is not exact."""
    module = models.build(arch)
    faces = rng.integers(0, 256, (16, *models.INPUT_SHAPE), np.uint8)

    def batch_statistics(variables, x):
        stats = {}

        def normalise_with_batch_stats(next_fun, args, kwargs, context):
            bn = context.module
            if context.method_name != "__call__" or not isinstance(bn, nn.BatchNorm):
                return next_fun(*args, **kwargs)
            x = args[0]
            axes = tuple(range(x.ndim - 1))
            mean, var = x.mean(axes), x.var(axes)
            stats[bn.path] = (mean, var)
            y = (x - mean) / jnp.sqrt(var + bn.epsilon)
            if bn.use_scale:
                y = y * bn.get_variable("params", "scale")
            return y + bn.get_variable("params", "bias") if bn.use_bias else y

        with nn.intercept_methods(normalise_with_batch_stats):
            module.apply(variables, x, train=False)
        return stats

    x = models.preprocess(faces, models.input_spec(arch))
    stats = jax.jit(batch_statistics)(variables, x)
    flat = traverse_util.flatten_dict(variables)
    for path, (mean, var) in stats.items():
        shift = 1 + 0.1 * rng.normal(size=mean.shape)
        flat[("batch_stats", *path, "mean")] = (np.asarray(mean) * shift).astype(np.float32)
        flat[("batch_stats", *path, "var")] = (np.asarray(var) * shift**2).astype(np.float32)
    return traverse_util.unflatten_dict(flat)


def session(model_or_path):
    source = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def onnx_input(images_uint8_rgb, spec):
    """What insightface feeds the graph: RGB NCHW, normalised only for the default spec."""
    x = images_uint8_rgb.astype(np.float32).transpose(0, 3, 1, 2)
    return (x - 127.5) / 127.5 if spec == export.INSIGHTFACE_DEFAULT_SPEC else x


def assert_onnx_matches_jax(onnx_model_, arch, variables, spec, batches=(1, 7)):
    encoder = FaceEncoder(arch, variables, spec, batch_size=max(batches))
    sess = session(onnx_model_)
    (graph_input,), (graph_output,) = sess.get_inputs(), sess.get_outputs()
    assert graph_input.shape == ["N", 3, 112, 112] and graph_output.shape == ["N", 512]
    faces = np.random.default_rng(1).integers(0, 256, (max(batches), 112, 112, 3), np.uint8)
    embeddings, _ = encoder.encode(faces)
    # The test has power only if the embedding depends on the face.
    assert np.abs(embeddings @ embeddings.T - np.eye(len(faces))).max() < 0.99
    for batch in batches:
        expected = encoder.embed_raw(faces[:batch])
        got = sess.run(None, {graph_input.name: onnx_input(faces[:batch], spec)})[0]
        assert got.shape == expected.shape == (batch, 512)
        rel = np.abs(got - expected).max() / np.abs(expected).max()
        assert rel <= 1e-5, (arch, batch, rel)


def insightface_feeds_raw_pixels(model):
    """insightface ArcFaceONNX's rule: nodes named Sub*/_minus* and Mul*/_mul* among the first
    eight mean "feed raw 0..255" (else it feeds (x - 127.5) / 127.5)."""
    top = [node.name for node in model.graph.node[:8]]
    return any(n.startswith(("Sub", "_minus")) for n in top) and any(
        n.startswith(("Mul", "_mul")) for n in top
    )


@pytest.mark.parametrize(
    "arch", ["tiny", "magface_tiny", "mbf", "iresnet18", "magface_iresnet18", "ir_18", "vit_demo"]
)
def test_onnx_matches_jax_forward_on_random_weights(arch):
    variables = random_variables(arch)
    spec = models.input_spec(arch)
    model = export.onnx_model(variables, arch, spec)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["magjax_arch"] == arch and props["magjax_family"] == models.family(arch)
    assert insightface_feeds_raw_pixels(model) == (spec != export.INSIGHTFACE_DEFAULT_SPEC)
    if spec == export.INSIGHTFACE_DEFAULT_SPEC:  # not even one of the two names at the top
        top = [node.name for node in model.graph.node[:8]]
        assert not any(n.startswith(("Sub", "_minus", "Mul", "_mul")) for n in top), top
    assert_onnx_matches_jax(model, arch, variables, spec)


# ------------------------------------------------------------ insightface on a real face


# Square face boxes (centre x, centre y, side) in insightface's t1.jpg (1280x886 group photo).
T1_FACES = ((110, 335, 150), (524, 335, 150), (820, 385, 140), (1190, 345, 140))


def insightface_faces():
    """Real faces shipped with insightface, RGB uint8 [5, 112, 112, 3]: the aligned Tom Hanks
    face (a greyscale image) and four colour face crops of t1.jpg resized to 112x112."""
    import cv2
    import insightface

    images = pathlib.Path(insightface.__file__).parent / "data/images"
    tom = cv2.imread(str(images / "Tom_Hanks_54745.png"))
    group = cv2.imread(str(images / "t1.jpg"))
    assert tom is not None and tom.shape == (112, 112, 3) and group is not None
    crops = [
        cv2.resize(
            group[y - s // 2 : y + s // 2, x - s // 2 : x + s // 2],
            (112, 112),
            interpolation=cv2.INTER_AREA,
        )
        for x, y, s in T1_FACES
    ]
    return np.ascontiguousarray(np.stack([tom, *crops])[..., ::-1])


def insightface_agrees(onnx_path, workdir, faces_rgb):
    """Per face: insightface's get_feat on BGR equals FaceEncoder.encode on RGB (cosine >=
    0.9999, norm within 1e-3 relative)."""
    from insightface.model_zoo import get_model
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    recogniser = get_model(str(onnx_path), providers=["CPUExecutionProvider"])
    assert isinstance(recogniser, ArcFaceONNX)
    feats = recogniser.get_feat([np.ascontiguousarray(f[..., ::-1]) for f in faces_rgb])
    embeddings, norms = FaceEncoder.load(workdir, batch_size=len(faces_rgb)).encode(faces_rgb)
    feat_norms = np.linalg.norm(feats, axis=1)
    cosines = np.sum(feats / feat_norms[:, None] * embeddings, axis=1)
    return (cosines >= 0.9999) & (np.abs(feat_norms - norms) <= 1e-3 * norms), cosines


# Each arch with an arch of another input convention (whose spec is the wrong one for it).
@pytest.mark.parametrize(
    "arch,wrong_arch",
    [
        ("tiny", "magface_tiny"),
        ("magface_tiny", "tiny"),
        ("ir_18", "tiny"),
        ("vit_demo", "magface_tiny"),
    ],
)
def test_insightface_reproduces_face_encoder(tmp_path, capsys, arch, wrong_arch):
    """The three conventions (arcface_torch RGB; MagFace BGR x/255; AdaFace BGR
    (x/255-0.5)/0.5) through insightface's own loader and preprocessing."""
    workdir = tmp_path / "run"
    variables = random_variables(arch, seed=3)
    checkpoint.save_inference_model(
        workdir / "model_best", variables, {"arch": arch, "input_spec": models.input_spec(arch)}
    )
    out = tmp_path / "model.onnx"
    assert export.main(["--workdir", str(workdir), "--best", "--out", str(out)]) == 0, (
        capsys.readouterr().err
    )
    faces = insightface_faces()
    ok, cosines = insightface_agrees(out, workdir / "model_best", faces)
    assert ok.all(), cosines

    # The same weights exported with another family's convention must fail the same check
    # (on the colour faces at least: the greyscale face hides a channel swap).
    import onnx

    wrong = export.onnx_model(variables, arch, models.input_spec(wrong_arch))
    onnx.save(wrong, str(tmp_path / "wrong.onnx"))
    ok, cosines = insightface_agrees(tmp_path / "wrong.onnx", workdir / "model_best", faces)
    assert not ok[1:].any(), cosines


# ------------------------------------------------- official PyTorch layouts, round trip
# (The ViT's: test_convert.test_vit_conversion_matches_pytorch_on_real_faces, which converts a
# ViT-T checkpoint, compares with PyTorch, exports to ONNX and back to arcface_torch in one go.)


@pytest.mark.parametrize(
    "source,arch",
    [("arcface_torch", "iresnet18"), ("magface", "magface_iresnet18"), ("adaface", "ir_18")],
)
def test_official_layout_round_trip_and_onnx(tmp_path, capsys, source, arch):
    """official checkpoint -> magjax.convert -> magjax.export --to: the same tensors bit for
    bit, loadable with strict=True; and the ONNX of the converted model equals its JAX forward."""
    torch = pytest.importorskip("torch")
    from test_convert import _randomise, _save_official_layout

    from magjax.models import torch_reference

    module = _randomise(torch_reference.build_torch(arch), seed=5)
    original = module.state_dict()
    ckpt = _save_official_layout(module, source, arch, tmp_path / "official.ckpt")
    converted = tmp_path / "converted"
    assert (
        convert.main(["--from", source, str(ckpt), "--arch", arch, "--out", str(converted)]) == 0
    ), capsys.readouterr().err
    exported = tmp_path / "exported.pth"
    assert (
        export.main(["--workdir", str(converted), "--to", source, "--out", str(exported)]) == 0
    ), capsys.readouterr().err

    loaded = torch.load(exported, map_location="cpu", weights_only=True)
    # Each repository's own unwrapping of its checkpoint.
    if source == "arcface_torch":
        state = loaded
    elif source == "magface":
        assert loaded["arch"] == arch.removeprefix("magface_")
        state = {k.removeprefix("module.features."): v for k, v in loaded["state_dict"].items()}
    else:
        state = {
            k[len("model.") :]: v for k, v in loaded["state_dict"].items() if k.startswith("model.")
        }
    assert sorted(state) == sorted(original)  # key order is not part of the layout
    for key, tensor in original.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key
    torch_reference.build_torch(arch).load_state_dict(state, strict=True)

    # The converted weights through ONNX.
    variables, meta = checkpoint.load_inference_model(converted)
    assert_onnx_matches_jax(
        export.onnx_model(variables, arch, meta["input_spec"]),
        arch,
        variables,
        meta["input_spec"],
        batches=(7,),
    )


def test_user_errors_are_one_line(tmp_path, capsys):
    assert (
        export.main(["--workdir", str(tmp_path / "nothing"), "--out", str(tmp_path / "m.onnx")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nothing" in err and "model.json" in err
    workdir = tmp_path / "run"
    checkpoint.save_inference_model(
        workdir / "model",
        random_variables("tiny"),
        {"arch": "tiny", "input_spec": models.input_spec("tiny")},
    )
    assert (
        export.main(
            ["--workdir", str(workdir), "--to", "arcface_torch", "--out", str(tmp_path / "m.pth")]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "demo net" in err
    assert not (tmp_path / "m.pth").exists()
    assert (
        export.main(["--workdir", str(workdir), "--best", "--out", str(tmp_path / "m.onnx")]) == 2
    )
    assert "model_best" in capsys.readouterr().err
    existing = tmp_path / "existing.onnx"
    existing.write_bytes(b"an earlier export")
    assert export.main(["--workdir", str(workdir), "--out", str(existing)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert existing.read_bytes() == b"an earlier export"
    assert export.main(["--workdir", str(workdir), "--out", str(existing), "--overwrite"]) == 0
    assert existing.read_bytes() != b"an earlier export"


def test_model_over_the_protobuf_limit_is_written_with_external_data(tmp_path, capsys, monkeypatch):
    """vit_h's ~3 GB of weights exceed protobuf's 2 GiB: such a model is written as a graph and
    one external-data file beside it (here the threshold is lowered so that vit_demo crosses
    it). onnxruntime and insightface load it by path and give the self-contained file's output
    exactly; both files appear whole or not at all and a rerun refuses either."""
    import stat

    import onnx
    from insightface.model_zoo import get_model
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    arch = "vit_demo"
    variables = random_variables(arch, seed=4)
    spec = models.input_spec(arch)
    workdir = tmp_path / "run"
    checkpoint.save_inference_model(
        workdir / "model", variables, {"arch": arch, "input_spec": spec}
    )
    single, out = tmp_path / "single.onnx", tmp_path / "big.onnx"
    data = tmp_path / "big.onnx.data"
    assert export.main(["--workdir", str(workdir), "--out", str(single)]) == 0
    assert "weights" not in capsys.readouterr().out
    assert not (tmp_path / "single.onnx.data").exists()
    full_weights = export.weight_bytes(onnx.load(str(single)))
    assert full_weights > 2**21  # vit_demo: ~2.9 MB of float32 weights

    monkeypatch.setattr(export, "EXTERNAL_DATA_THRESHOLD", 2**20)
    assert export.main(["--workdir", str(workdir), "--out", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"its weights {data} " in printed and "\n" not in printed.strip()
    # Nothing else (no temporary directory) is left beside them; the weights file has the
    # user's file mode (onnx creates it 0600, which would hide it from a serving container).
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "big.onnx",
        "big.onnx.data",
        "run",
        "single.onnx",
    ]
    assert stat.S_IMODE(data.stat().st_mode) == stat.S_IMODE(single.stat().st_mode)
    graph_only = onnx.load(str(out), load_external_data=False)
    locations = {
        entry.value
        for tensor in graph_only.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    assert locations == {"big.onnx.data"}
    # All but the tensors under 1 KiB (onnx's size_threshold) are in the data file.
    assert out.stat().st_size < 0.02 * full_weights < 0.02 * data.stat().st_size / 0.99
    onnx.checker.check_model(str(out))

    faces = insightface_faces()
    x = onnx_input(faces, spec)
    expected = session(str(single)).run(None, {export.INPUT_NAME: x})[0]
    np.testing.assert_array_equal(session(str(out)).run(None, {export.INPUT_NAME: x})[0], expected)
    recogniser = get_model(str(out), providers=["CPUExecutionProvider"])
    assert isinstance(recogniser, ArcFaceONNX)
    bgr = [np.ascontiguousarray(f[..., ::-1]) for f in faces]
    reference = get_model(str(single), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(recogniser.get_feat(bgr), reference.get_feat(bgr))

    # A rerun without --overwrite refuses the graph, or the weights of an earlier export alone.
    before = (out.read_bytes(), data.read_bytes())
    assert export.main(["--workdir", str(workdir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"--out {out} already exists" in err
    moved = tmp_path / "moved.onnx"
    out.rename(moved)
    assert export.main(["--workdir", str(workdir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: {data} ") and "--overwrite" in err
    assert not out.exists() and data.read_bytes() == before[1]
    moved.rename(out)

    # A failed write (the check, after both files are written) leaves the earlier pair as it
    # was and nothing else.
    def fail(model, *args, **kwargs):
        raise onnx.checker.ValidationError("injected")

    model = export.onnx_model(variables, arch, spec)
    with monkeypatch.context() as patch:
        patch.setattr(onnx.checker, "check_model", fail)
        with pytest.raises(onnx.checker.ValidationError, match="injected"):
            export.save_onnx(model, out)
    assert (out.read_bytes(), data.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "big.onnx",
        "big.onnx.data",
        "run",
        "single.onnx",
    ]

    # --overwrite with the real threshold: one self-contained file, the stale weights removed.
    monkeypatch.undo()
    assert export.main(["--workdir", str(workdir), "--out", str(out), "--overwrite"]) == 0
    assert not data.exists() and out.read_bytes() == single.read_bytes()
