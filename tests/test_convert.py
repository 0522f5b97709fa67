"""Import of official PyTorch checkpoints: per-family parity with a PyTorch forward, checkpoint
layouts, refusal of pickled code, and errors naming the offending tensor."""

import argparse
import collections
import json
import sys

import jax
import numpy as np
import pytest

from magjax import checkpoint, convert, models
from magjax.errors import UserError

torch = pytest.importorskip("torch")
from magjax.models import torch_reference  # noqa: E402  (needs torch)


def _randomise(module, seed=0):
    """Random weights everywhere, BatchNorm running statistics included, so that every tensor
    of the checkpoint influences the embedding."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if not tensor.dtype.is_floating_point:
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
            elif name.endswith(("running_mean", "bias")):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=g))
            elif tensor.ndim == 1:  # BatchNorm scale or PReLU slope
                tensor.copy_(1.0 + 0.2 * torch.randn(tensor.shape, generator=g))
            else:
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    return module.eval()


def _save_official_layout(module, source, arch, path):
    """Writes ``module`` the way each official repository saves its checkpoints."""
    state = module.state_dict()
    if source == "arcface_torch":  # backbone.pth: torch.save(backbone.module.state_dict())
        obj = state
    elif source == "magface":  # SoftmaxBuilder under DataParallel, plus the MagLinear weight
        obj = {
            "epoch": 25,
            "arch": arch.removeprefix("magface_"),
            "state_dict": {
                **{f"module.features.{k}": v for k, v in state.items()},
                "module.fc.weight": torch.randn(512, 10),
            },
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        }
    else:  # PyTorch Lightning checkpoint of AdaFace's trainer
        obj = {
            "epoch": 25,
            "global_step": 1000,
            "pytorch-lightning_version": "1.8.6",
            "state_dict": {
                **{f"model.{k}": v for k, v in state.items()},
                "head.kernel": torch.randn(512, 10),
                "head.t": torch.zeros(1),
                "head.batch_mean": torch.ones(1) * 20,
                "head.batch_std": torch.ones(1) * 100,
            },
            "optimizer_states": [
                {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]}
            ],
            "lr_schedulers": [
                {"milestones": collections.Counter([12, 20, 24]), "gamma": 0.1, "last_epoch": 25}
            ],
            "hparams_name": "kwargs",
            "hyper_parameters": argparse.Namespace(arch=arch, head="adaface", m=0.4, h=0.333),
        }
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    "source,arch",
    [
        ("arcface_torch", "iresnet18"),
        ("magface", "magface_iresnet18"),
        ("adaface", "ir_18"),
        ("arcface_torch", "mbf"),
    ],
)
def test_conversion_matches_pytorch_forward(tmp_path, capsys, source, arch):
    module = _randomise(torch_reference.build_torch(arch))
    if arch == "iresnet18":
        # Official value is 1.0; random here proves features.weight is loaded, not assumed.
        assert not module.features.weight.requires_grad
        with torch.no_grad():
            module.features.weight.copy_(torch.rand(512) + 0.5)
    ckpt = _save_official_layout(module, source, arch, tmp_path / "official.ckpt")
    out = tmp_path / "converted"
    argv = ["--from", source, str(ckpt), "--arch", arch, "--out", str(out)]
    assert convert.main(argv) == 0, capsys.readouterr().err

    variables, meta = checkpoint.load_inference_model(out)
    assert meta["arch"] == arch and meta["family"] == source
    assert meta["input_spec"] == models.input_spec(arch)
    assert meta["embedding_dim"] == 512
    assert meta["converted_from"] == {"path": str(ckpt.absolute()), "family": source}
    assert json.loads((out / "model.json").read_text()) == meta

    x = np.random.default_rng(1).normal(size=(2, 112, 112, 3)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    model = models.build(arch)
    got = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
    assert got.dtype == np.float32 and got.shape == expected.shape == (2, 512)
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    assert rel < 1e-4, rel


def _uninitialised_torch(arch):
    """``arch``'s PyTorch module with uninitialised floating-point tensors (for
    :func:`_randomise` to fill) and zero ``num_batches_tracked``, built without running the
    official initialisers: the ViTs' ``trunc_normal_`` of millions of weights takes seconds."""
    with torch.device("meta"):
        module = torch_reference.build_torch(arch)
    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in module.buffers():
            if not tensor.dtype.is_floating_point:
                tensor.zero_()
    return module


def _agreement(got, expected):
    """Per row: cosine of ``got`` with ``expected`` and relative difference of their norms."""
    got_norms, norms = np.linalg.norm(got, axis=1), np.linalg.norm(expected, axis=1)
    cosines = np.sum(got * expected, axis=1) / (got_norms * norms)
    return cosines, np.abs(got_norms - norms) / norms


# ViT-S through the export too would add ~15 s on 2 CPU cores (serialising and running a 76 M
# parameter ONNX file) and test no wiring that ViT-T does not.
@pytest.mark.parametrize("arch,through_export", [("vit_t", True), ("vit_s", False)])
def test_vit_conversion_matches_pytorch_on_real_faces(tmp_path, capsys, arch, through_export):
    """arcface_torch's ViT end to end on real face crops: backbone.pth -> ``magjax.convert``
    -> ``FaceEncoder`` equals the PyTorch ViT's own embeddings (cosine >= 0.9999, norm within
    1e-3); with ``through_export``, so does insightface's ``get_feat`` on the ``magjax.export``
    ONNX file, and ``export --to arcface_torch`` writes the checkpoint back bit for bit. One
    test, so that the model (19 M / 76 M parameters) is converted and compiled once."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("insightface")
    from insightface.model_zoo import get_model
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from test_export import insightface_faces

    from magjax import export
    from magjax.encoder import FaceEncoder

    module = _randomise(_uninitialised_torch(arch), seed=7)
    with torch.no_grad():  # _randomise's fan-in scale would make it ~0.005: too small to matter
        module.pos_embed.normal_(0.0, 0.5)
    original = module.state_dict()
    ckpt = _save_official_layout(module, "arcface_torch", arch, tmp_path / "backbone.pth")
    out = tmp_path / "converted"
    argv = ["--from", "arcface_torch", str(ckpt), "--arch", arch, "--out", str(out)]
    assert convert.main(argv) == 0, capsys.readouterr().err

    faces = insightface_faces()  # RGB uint8 [5, 112, 112, 3]
    x = (faces.astype(np.float32) / 255 - 0.5) / 0.5  # arcface_torch's input convention
    with torch.no_grad():
        expected = module(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    unit = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    # The test has power only if the embedding depends on the face.
    assert (unit @ unit.T - np.eye(len(faces))).max() < 0.99
    embeddings, quality = FaceEncoder.load(out, batch_size=len(faces)).encode(faces)
    cosines, norm_errors = _agreement(embeddings * quality[:, None], expected)
    assert (cosines >= 0.9999).all() and (norm_errors <= 1e-3).all(), (cosines, norm_errors)
    if not through_export:
        return

    onnx_path = tmp_path / "model.onnx"
    assert export.main(["--workdir", str(out), "--out", str(onnx_path)]) == 0, (
        capsys.readouterr().err
    )
    recogniser = get_model(str(onnx_path), providers=["CPUExecutionProvider"])
    # arcface_torch's convention: insightface must normalise itself, (x - 127.5) / 127.5.
    assert isinstance(recogniser, ArcFaceONNX)
    assert (recogniser.input_mean, recogniser.input_std) == (127.5, 127.5)
    feats = recogniser.get_feat([np.ascontiguousarray(face[..., ::-1]) for face in faces])
    cosines, norm_errors = _agreement(feats, expected)
    assert (cosines >= 0.9999).all() and (norm_errors <= 1e-3).all(), (cosines, norm_errors)

    exported = tmp_path / "exported.pth"
    assert (
        export.main(["--workdir", str(out), "--to", "arcface_torch", "--out", str(exported)]) == 0
    ), capsys.readouterr().err
    state = torch.load(exported, map_location="cpu", weights_only=True)
    assert sorted(state) == sorted(original)
    for key, tensor in original.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key


def test_torch_reference_has_official_layout_and_counts():
    """The parity modules must save exactly the official key names, else the converter would be
    tested against a layout no real checkpoint has."""
    expectations = {
        "iresnet18": (
            24_025_600,
            [
                "conv1.weight",
                "bn1.running_mean",
                "prelu.weight",
                "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.running_var",
                "layer4.1.bn3.bias",
                "layer2.1.prelu.weight",
                "bn2.weight",
                "fc.weight",
                "fc.bias",
                "features.weight",
                "features.running_var",
            ],
            ["layer1.1.downsample.0.weight"],
        ),
        "ir_18": (
            24_020_352,
            [
                "input_layer.0.weight",
                "input_layer.2.weight",
                "body.0.res_layer.3.weight",
                "body.2.shortcut_layer.1.running_mean",
                "output_layer.0.weight",
                "output_layer.3.weight",
                "output_layer.4.running_mean",
            ],
            [
                "body.0.shortcut_layer.0.weight",
                "output_layer.4.weight",
                "body.1.shortcut_layer.1.bias",
            ],
        ),
        "mbf": (
            2_059_520,
            [
                "layers.0.layers.0.weight",
                "layers.1.layers.2.weight",
                "layers.2.layers.1.layers.0.weight",
                "layers.3.layers.3.layers.2.layers.1.running_var",
                "conv_sep.layers.2.weight",
                "features.layers.0.layers.0.weight",
                "features.layers.2.weight",
                "features.layers.3.bias",
            ],
            ["features.layers.2.bias"],
        ),
    }
    for arch, (count, present, absent) in expectations.items():
        module = torch_reference.build_torch(arch)
        assert sum(p.numel() for p in module.parameters()) == count
        keys = set(module.state_dict())
        assert set(present) <= keys, sorted(set(present) - keys)
        assert not set(absent) & keys


@pytest.fixture(scope="module")
def mbf_state():
    module = torch_reference.build_torch("mbf")
    return {k: v.numpy() for k, v in module.state_dict().items() if "num_batches" not in k}


def test_missing_unexpected_and_misshaped_tensors_are_named(mbf_state):
    state = dict(mbf_state)
    del state["layers.0.layers.1.running_var"]
    state["extra.weight"] = np.zeros((3, 3), np.float32)
    state["conv_sep.layers.0.weight"] = np.zeros((512, 128, 1, 1), np.float32)
    with pytest.raises(convert.ConversionError) as info:
        convert.convert_state_dict(state, "mbf")
    message = str(info.value)
    assert "missing tensor 'layers.0.layers.1.running_var' (expected shape (128,))" in message
    assert "unexpected tensor 'extra.weight' (3, 3)" in message
    assert "'conv_sep.layers.0.weight' has shape (512, 128, 1, 1), expected (512, 256, 1, 1)" in (
        message
    )


def test_vit_checkpoint_is_read_strictly():
    """Every tensor of a ViT checkpoint is required and shape-checked, the raw parameters
    ``pos_embed`` and ``mask_token`` (which inference does not use) included."""
    with torch.device("meta"):
        shapes = torch_reference.build_torch("vit_t").state_dict()
    state = {k: np.zeros(v.shape, np.float32) for k, v in shapes.items() if "num_batches" not in k}
    convert.convert_state_dict(state, "vit_t")  # complete: converts
    del state["pos_embed"], state["mask_token"]
    state["blocks.3.attn.qkv.weight"] = np.zeros((256, 768), np.float32)
    state["blocks.12.norm1.weight"] = np.zeros(256, np.float32)  # a block of a deeper ViT
    with pytest.raises(convert.ConversionError) as info:
        convert.convert_state_dict(state, "vit_t")
    message = str(info.value)
    assert "missing tensor 'pos_embed' (expected shape (1, 144, 256))" in message
    assert "missing tensor 'mask_token' (expected shape (1, 1, 256))" in message
    assert (
        "'blocks.3.attn.qkv.weight' has shape (256, 768), expected (768, 256) (transposed?)"
    ) in message
    assert "unexpected tensor 'blocks.12.norm1.weight' (256,)" in message


def test_wrong_arch_for_checkpoint_is_an_error(mbf_state):
    with pytest.raises(
        convert.ConversionError, match=r"\d+ missing, \d+ unexpected tensors.*'bn1.bias'.*'conv_sep"
    ):
        convert.convert_state_dict(mbf_state, "iresnet18")
    with pytest.raises(convert.ConversionError, match="family 'arcface_torch', not 'magface'"):
        convert.convert("unused.pth", "magface", "iresnet50", "unused")
    with pytest.raises(convert.ConversionError, match="no official checkpoint"):
        convert.convert("unused.pth", "arcface_torch", "tiny", "unused")


def test_family_layouts_reject_foreign_keys():
    tensor = torch.zeros(2)
    with pytest.raises(convert.ConversionError, match="unexpected tensor 'module.other.weight'"):
        convert.backbone_state_dict(
            {"state_dict": {"module.other.weight": tensor}}, "magface", "m.pth"
        )
    with pytest.raises(convert.ConversionError, match="'state_dict'"):
        convert.backbone_state_dict({"model.conv.weight": tensor}, "adaface", "a.ckpt")
    # MagFace under DistributedDataParallel: features.module.*; the MagLinear weight is skipped.
    got = convert.backbone_state_dict(
        {"state_dict": {"features.module.bn1.bias": tensor, "fc.weight": tensor}}, "magface"
    )
    assert list(got) == ["bn1.bias"]
    # arcface_torch training checkpoints keep the backbone under state_dict_backbone.
    got = convert.backbone_state_dict(
        {"state_dict_backbone": {"fc.bias": tensor, "bn1.num_batches_tracked": torch.tensor(3)}},
        "arcface_torch",
    )
    assert list(got) == ["fc.bias"]


class _Payload:
    """Unpickling this would create ``marker``: stands for arbitrary code in a checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("source", ["arcface_torch", "magface", "adaface"])
def test_pickled_code_is_refused(tmp_path, source):
    marker = tmp_path / "executed"
    ckpt = tmp_path / "evil.pth"
    torch.save({"state_dict": {"model.fc.bias": torch.zeros(2)}, "x": _Payload(marker)}, ckpt)
    with pytest.raises(convert.ConversionError, match="refusing to load.*GLOBAL io.open"):
        convert.load_checkpoint(ckpt, source)
    assert not marker.exists()
    assert convert.main(["--from", source, str(ckpt), "--arch", "ir_18", "--out", "o"]) == 2


def test_namespace_allowed_only_for_adaface(tmp_path):
    ckpt = tmp_path / "hp.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": argparse.Namespace(m=0.4)}, ckpt)
    assert convert.load_checkpoint(ckpt, "adaface")["hyper_parameters"].m == 0.4
    with pytest.raises(convert.ConversionError, match="argparse.Namespace"):
        convert.load_checkpoint(ckpt, "magface")


def test_missing_torch_and_missing_file_give_clear_errors(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "a.pth"
    ckpt.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(UserError, match="requirements-convert.txt"):
        convert.load_checkpoint(ckpt, "arcface_torch")
    monkeypatch.undo()
    argv = ["--from", "adaface", str(tmp_path / "nope.ckpt"), "--arch", "ir_50", "--out", "o"]
    assert convert.main(argv) == 2
    assert "nope.ckpt does not exist" in capsys.readouterr().err
