"""FaceEncoder, python -m magjax.extract and python -m magjax.evaluate with a tiny random model."""

import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from magjax import checkpoint, evaluate, evaluators, extract, models
from magjax.data import images
from magjax.encoder import FaceEncoder
from magjax.eval import verification

DIM = 32


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir whose exported model (workdir/model) is a random 'tiny' backbone."""
    root = tmp_path_factory.mktemp("run")
    checkpoint.save_inference_model(
        root / "model",
        random_variables(),
        {"arch": "tiny", "input_spec": models.input_spec("tiny")},
    )
    return root


def random_variables(seed=0):
    """Random 'tiny' variables of the right shapes, filled with NumPy (module.init compiles
    every initializer op by op: ~20 s on this CPU). Fan-in scaled weights, unit BN statistics."""
    module = models.build("tiny", embedding_dim=DIM)
    shapes = jax.eval_shape(
        lambda k: module.init(k, jnp.zeros((1, 112, 112, 3)), train=False), jax.random.key(0)
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if leaf.ndim >= 2:
            return rng.normal(0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
        if "var" in name:
            return np.ones(leaf.shape)
        if "scale" in name:
            return np.ones(leaf.shape) + 0.1 * rng.normal(size=leaf.shape)
        return 0.05 * rng.normal(size=leaf.shape)

    return jax.tree_util.tree_map_with_path(lambda p, x: fill(p, x).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def encoder(workdir):
    return FaceEncoder.load(workdir, batch_size=8)


def faces(seed, n):
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def test_encode_matches_a_manual_forward_pass(encoder, workdir):
    images = faces(0, 11)  # not a multiple of the batch size: the padded rows must not leak
    emb, q = encoder.encode(images)
    variables, meta = checkpoint.load_inference_model(workdir / "model")
    x = (images.astype(np.float32) / 255.0 - 0.5) / 0.5  # arcface_torch: RGB, (x/255-0.5)/0.5
    raw = np.asarray(models.build("tiny", embedding_dim=DIM).apply(variables, x, train=False))
    np.testing.assert_allclose(q, np.linalg.norm(raw, axis=1), rtol=1e-5)
    np.testing.assert_allclose(
        emb, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-4, atol=1e-6
    )
    assert emb.dtype == np.float32 and emb.shape == (11, DIM)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)
    # the model directory itself loads the same way as the workdir
    assert FaceEncoder.load(workdir / "model").embedding_dim == DIM


def test_bgr_family_convention_is_applied(workdir, tmp_path):
    variables, _ = checkpoint.load_inference_model(workdir / "model")
    bgr_spec = {"channel_order": "BGR", "mean": 0.0, "std": 1.0}  # the MagFace convention
    checkpoint.save_inference_model(
        tmp_path / "bgr", variables, {"arch": "tiny", "input_spec": bgr_spec}
    )
    bgr = FaceEncoder.load(tmp_path / "bgr", batch_size=4)
    rgb = FaceEncoder(
        "tiny",
        variables,
        {"channel_order": "RGB", "mean": 0.0, "std": 1.0},
        embedding_dim=DIM,
        batch_size=4,
    )
    images = faces(1, 4)
    got, q_got = bgr.encode(images)
    want, q_want = rgb.encode(np.ascontiguousarray(images[..., ::-1]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q_got, q_want, rtol=1e-5)
    # and the channel order does change the output (the check above is not vacuous)
    assert np.abs(rgb.encode(images)[0] - got).max() > 1e-3


def test_encoder_errors(encoder, tmp_path):
    with pytest.raises(ValueError, match=r"\[N, 112, 112, 3\]"):
        encoder.encode(np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        encoder.encode(np.zeros((2, 112, 112, 3), np.float32))
    with pytest.raises(FileNotFoundError, match="model.json"):
        FaceEncoder.load(tmp_path)


def test_extract_cli(workdir, encoder, tmp_path, capsys):
    root = tmp_path / "imgs"
    (root / "b").mkdir(parents=True)
    (root / "a").mkdir()
    imgs = faces(2, 3)
    Image.fromarray(imgs[0]).save(root / "b" / "x.png")
    Image.fromarray(imgs[1]).save(root / "a" / "y.png")
    Image.fromarray(imgs[2]).resize((150, 150)).convert("L").save(root / "a" / "z.jpg")
    (root / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "feats.npz"
    argv = [
        "--workdir",
        str(workdir),
        "--images",
        str(root),
        "--out",
        str(out),
        "--batch",
        "2",
        "--no-progress",
    ]
    assert extract.main(argv) == 2  # an unreadable image is a user error naming the file
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "a/broken.jpg cannot be decoded" in err
    assert not out.exists()
    assert extract.main([*argv, "--skip-unreadable"]) == 0
    data = np.load(out)
    assert [p.split("imgs/")[1] for p in data["paths"]] == ["a/y.png", "a/z.jpg", "b/x.png"]
    assert [p.split("imgs/")[1] for p in data["skipped"]] == ["a/broken.jpg"]
    want = np.stack([images.read_face(p) for p in data["paths"]])
    assert want[1].shape == (112, 112, 3)  # grey 150px image -> RGB 112px
    emb, q = encoder.encode(want)
    np.testing.assert_allclose(data["embeddings"], emb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(data["quality"], q, rtol=1e-5)
    # a list file (relative paths resolved against its directory) gives the same rows
    listing = tmp_path / "list.txt"
    listing.write_text("imgs/b/x.png\n\nimgs/a/y.png\n")
    extract.main(
        [
            "--workdir",
            str(workdir),
            "--images",
            str(listing),
            "--out",
            str(tmp_path / "l.npz"),
            "--no-progress",
        ]
    )
    data2 = np.load(tmp_path / "l.npz")
    np.testing.assert_allclose(data2["embeddings"][0], data["embeddings"][2], rtol=1e-4, atol=1e-6)


def test_evaluate_cli(workdir, encoder, tmp_path):
    from test_eval_ijb import write_benchmark

    from magjax.data.verification_bin import load_bin

    # a verification set in the real format: pickle of (JPEG bytes list, issame list)
    rng = np.random.default_rng(5)
    images = faces(3, 40)
    issame = rng.random(20) < 0.5
    images[1::2][issame] = images[0::2][issame]  # genuine pairs share their image
    jpegs = []
    for img in images:
        path = tmp_path / "tmp.jpg"
        Image.fromarray(img).save(path, quality=95)
        jpegs.append(path.read_bytes())
    with open(tmp_path / "toy.bin", "wb") as f:
        pickle.dump((jpegs, issame.tolist()), f, protocol=2)
    # identity folders for clustering
    for k in range(3):
        (tmp_path / "ids" / f"id{k}").mkdir(parents=True)
        for j in range(3):
            Image.fromarray(faces(10 + k, 1)[0]).save(tmp_path / "ids" / f"id{k}" / f"{j}.png")
    write_benchmark(tmp_path / "IJBB", seed=1, identities=3, prefix="ijbb")
    out = tmp_path / "eval"
    assert (
        evaluate.main(
            [
                "--workdir",
                str(workdir),
                "--bins",
                str(tmp_path / "toy.bin"),
                "--ijb",
                str(tmp_path / "IJBB"),
                "--target",
                "IJBB",
                "--cluster",
                str(tmp_path / "ids"),
                "--out",
                str(out),
                "--batch",
                "8",
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads((out / "eval.json").read_text())
    # the verification numbers are those of verification.run on the decoded images
    decoded, flags = load_bin(tmp_path / "toy.bin")
    direct = verification.run(encoder.embed_raw, decoded, flags, batch_size=8)
    toy = report["verification"]["toy"]
    assert toy["accuracy"] == direct["accuracy"] and toy["xnorm"] == pytest.approx(direct["xnorm"])
    assert toy["accuracy"] == 1.0  # identical images: distance 0 for every genuine pair
    assert set(report["ijb"]) >= {"insightface_N1D1F1", "magface_plus_F1", "adaface_F1"}
    # clustering the same image three times per identity is trivially perfect
    assert report["cluster"]["agglomerative"]["fmeasure"] == pytest.approx(1.0)
    for name, size in [
        ("erc.png", (800, 450)),
        ("magnitude_hist.png", (800, 450)),
        ("mean_faces_toy.png", (8 * 160, 200)),
        ("roc_IJBB.png", (800, 450)),
    ]:
        with Image.open(out / name) as img:
            assert (img.format, img.size) == ("PNG", size), name
    assert (out / "erc_toy.csv").read_text().startswith("reject_fraction,fnmr")


def test_cluster_protocol_csv_inputs(encoder, tmp_path):
    # IJB-B style protocol: files relative to --cluster-root, face boxes cropped and resized
    big = faces(20, 2)
    frame = np.zeros((200, 220, 3), np.uint8)
    frame[30:142, 40:152] = big[0]
    (tmp_path / "img").mkdir()
    Image.fromarray(frame).save(tmp_path / "img" / "1.png")
    Image.fromarray(big[1]).save(tmp_path / "img" / "2.png")
    csv_path = tmp_path / "cs1.csv"
    csv_path.write_text(
        "TEMPLATE_ID,SUBJECT_ID,FILENAME,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT\n"
        "7,1,img/1.png,40,30,112,112\n9,2,img/2.png,0,0,112,112\n"
        "9,2,img/2.png,0,0,112,112\n"
    )
    clustering = evaluators.Clustering(str(csv_path), str(tmp_path), batch_size=8)
    feats, labels = clustering.inputs(encoder)
    assert labels.tolist() == [1, 2]
    np.testing.assert_allclose(feats, encoder.encode(big)[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(OSError, match="protocol row 2"):
        evaluators.Clustering(str(csv_path), str(tmp_path / "elsewhere"), batch_size=8).inputs(
            encoder
        )


def test_variables_can_be_swapped_in_later(encoder, workdir):
    # the training loop's pattern: placeholder variables first, current ones assigned later
    late = FaceEncoder(
        "tiny",
        {"params": None, "batch_stats": None},
        models.input_spec("tiny"),
        embedding_dim=DIM,
        batch_size=8,
    )
    late.variables = checkpoint.load_inference_model(workdir / "model")[0]
    images = faces(7, 3)
    np.testing.assert_allclose(
        late.encode(images)[0], encoder.encode(images)[0], rtol=1e-5, atol=1e-6
    )
