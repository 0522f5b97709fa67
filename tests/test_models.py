"""Backbones: official parameter counts, shapes/dtypes, frozen scale, AdaFace shortcuts,
BatchNorm train/inference behaviour, input conventions."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from magjax import models
from magjax.models import __main__ as models_cli
from magjax.models import ir, iresnet, layers

# Parameter counts of the official PyTorch implementations (frozen ones included).
OFFICIAL_COUNTS = {
    "iresnet18": 24_025_600,
    "iresnet34": 34_139_328,
    "iresnet50": 43_590_848,
    "iresnet100": 65_156_160,
    "iresnet200": 118_833_920,
    "ir_18": 24_020_352,
    "ir_34": 34_134_080,
    "ir_50": 43_585_600,
    "ir_101": 65_150_912,
    "mbf": 2_059_520,
}


def _images(batch, seed=0, size=112):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, size, size, 3)), jnp.float32)


def _random_variables(model, x, seed=0):
    """Variables of ``model`` filled from numpy (an RNG-heavy ``model.init`` compiles slowly on
    CPU; the tests need realistic magnitudes, not the official initialisers)."""
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            value = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, size=shape)
        elif name == "weight":  # PReLU slope
            value = np.full(shape, 0.25)
        else:  # bias, running mean
            value = rng.normal(size=shape) * 0.1
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _small_iresnet(family, dropout=0.0, dtype=jnp.float32):
    """An iResNet of the given family at demo width (same code path as the official ones)."""
    return iresnet.IResNet(
        (1, 1, 1, 1),
        family=family,
        widths=(8, 16, 16, 32),
        stem_width=8,
        stem_stride=2,
        dropout=dropout,
        dtype=dtype,
    )


@pytest.mark.parametrize("arch", sorted(OFFICIAL_COUNTS))
def test_parameter_counts_match_official(arch):
    assert models.count_params(arch) == OFFICIAL_COUNTS[arch]


def test_magface_counts_equal_arcface_counts():
    # Same layers; only eps/momentum/dropout/init and the trainable final scale differ.
    for depth in (18, 50):
        assert models.count_params(f"magface_iresnet{depth}") == OFFICIAL_COUNTS[f"iresnet{depth}"]


def test_summary_cli_json(capsys):
    assert models_cli.main(["summary", "iresnet50", "--json"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["arch"] == "iresnet50"
    assert last["params"] == OFFICIAL_COUNTS["iresnet50"]
    assert last["embedding_dim"] == 512
    assert last["input_shape"] == [112, 112, 3]


def test_unknown_arch_lists_valid_ones():
    with pytest.raises(ValueError, match="iresnet50.*ir_101.*mbf"):
        models.build("resnet50")
    with pytest.raises(ValueError, match="unknown arch"):
        models.family("r50")


def test_unknown_arch_is_one_line_naming_the_valid_ones(capsys):
    with pytest.raises(models.UnknownArchError, match="unknown arch 'vit_x'; valid archs: .*vit_t"):
        models.arch_spec("vit_x")
    with pytest.raises(SystemExit) as exit_info:
        models_cli.main(["summary", "vit_x"])
    assert exit_info.value.code == 2
    error_lines = capsys.readouterr().err.strip().splitlines()
    assert len(error_lines) == 1 and "vit_x" in error_lines[0], error_lines


def test_every_arch_declares_the_official_state_dict_layout():
    """The registry's promise for every family at once: the Flax variables of each arch map by
    magjax.convert's rule onto exactly the keys and shapes of its PyTorch definition (built on
    torch's meta device: no memory), so conversion and export have nothing per-arch to add."""
    torch = pytest.importorskip("torch")
    from magjax import convert

    for arch in models.ARCHS:
        abstract = traverse_util.flatten_dict(models.abstract_variables(arch))
        ours = {
            convert._torch_key(collection, tuple(path)): convert._torch_shape(spec.shape, path[-1])
            for (collection, *path), spec in abstract.items()
        }
        with torch.device("meta"):
            module = models.arch_spec(arch).torch(models.dropout_rate(arch))
        theirs = {
            key: tuple(value.shape)
            for key, value in module.state_dict().items()
            if not key.endswith("num_batches_tracked")
        }
        assert ours == theirs, arch


def test_families_and_input_specs():
    assert models.family("iresnet100") == "arcface_torch"
    assert models.family("mbf") == "arcface_torch"
    assert models.family("magface_iresnet50") == "magface"
    assert models.family("ir_101") == "adaface"
    assert models.input_spec("iresnet50") == {"channel_order": "RGB", "mean": 0.5, "std": 0.5}
    assert models.input_spec("magface_iresnet18") == {
        "channel_order": "BGR",
        "mean": 0.0,
        "std": 1.0,
    }
    assert models.input_spec("ir_50") == {"channel_order": "BGR", "mean": 0.5, "std": 0.5}
    for arch in models.ARCHS:
        assert json.loads(json.dumps(models.input_spec(arch))) == models.input_spec(arch)


def test_preprocess_conventions_under_jit():
    pixel = np.array([[[[255, 0, 128]]]], np.uint8)  # one RGB pixel
    cases = {
        "iresnet18": [1.0, -1.0, (128 / 255 - 0.5) / 0.5],  # RGB, [-1, 1]
        "magface_iresnet18": [128 / 255, 0.0, 1.0],  # BGR, [0, 1]
        "ir_18": [(128 / 255 - 0.5) / 0.5, -1.0, 1.0],  # BGR, [-1, 1]
    }
    for arch, expected in cases.items():
        spec = models.input_spec(arch)
        got = jax.jit(lambda x, spec=spec: models.preprocess(x, spec))(pixel)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got)[0, 0, 0], expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="channel_order"):
        models.preprocess(pixel, {"channel_order": "GBR", "mean": 0, "std": 1})


def test_initialisers_follow_the_official_code():
    x = jnp.ones((1, 4, 4, 64))
    for block, std in [
        # arcface_torch: nn.init.normal_(conv.weight, 0, 0.1)
        (iresnet.IBasicBlock(64, 1, False, "arcface_torch"), 0.1),
        # MagFace and AdaFace: kaiming_normal_(mode="fan_out", relu) = N(0, 2 / (64 * 3 * 3))
        (iresnet.IBasicBlock(64, 1, False, "magface"), np.sqrt(2 / 576)),
        (ir.BasicBlockIR(64, 64, 1), np.sqrt(2 / 576)),
    ]:
        params = block.init(jax.random.key(0), x, train=False)["params"]
        for kernel in jax.tree.leaves(params):
            if kernel.ndim == 4:
                assert kernel.shape == (3, 3, 64, 64)
                np.testing.assert_allclose(np.std(kernel), std, rtol=0.03)
                assert abs(float(np.mean(kernel))) < 0.05 * std
        prelu = [v for k, v in traverse_util.flatten_dict(params).items() if k[-1] == "weight"]
        np.testing.assert_array_equal(prelu[0], 0.25)  # torch.nn.PReLU default
    # PyTorch's default Linear init (arcface_torch / MagFace fc): U(-1/sqrt(fan_in), ...).
    bound = 1 / np.sqrt(2048)
    kernel = layers.TORCH_DEFAULT_KERNEL(jax.random.key(1), (2048, 512))
    bias = layers.torch_default_bias(2048)(jax.random.key(2), (512,))
    for value in (kernel, bias):
        assert float(jnp.abs(value).max()) <= bound
        assert float(jnp.abs(value).max()) > 0.95 * bound
    np.testing.assert_allclose(np.std(kernel), bound / np.sqrt(3), rtol=0.01)


def test_tiny_forward_shape_and_dtypes():
    model = models.build("tiny")
    variables = _random_variables(model, _images(1))
    assert set(variables) == {"params", "batch_stats"}
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, _images(3))
    assert out.shape == (3, 512) and out.dtype == jnp.float32
    assert models.count_params("tiny") < 2_000_000


def test_magface_tiny_is_tiny_with_a_trainable_final_scale():
    """The MagFace demo net: same layers as ``tiny``, MagFace family (input convention, trainable
    final BatchNorm scale that lets the mean feature magnitude move)."""
    assert models.family("magface_tiny") == "magface"
    assert models.input_spec("magface_tiny") == models.input_spec("magface_iresnet18")
    assert models.count_params("magface_tiny") == models.count_params("tiny")
    model = models.build("magface_tiny", dropout=0.0)
    x = _images(4, size=32)
    variables = _random_variables(model, x)
    grads = jax.jit(lambda v: _loss_grads(model, v, x))(variables)
    assert np.any(np.asarray(grads["features"]["scale"]) != 0.0)
    assert all(jax.tree.leaves(models.trainable_mask("magface_tiny", variables["params"])))


def test_bf16_compute_keeps_float32_params_and_embedding():
    x = _images(2, size=32)
    for model32, model16 in [
        (models.build("tiny"), models.build("tiny", dtype=jnp.bfloat16)),
        (_small_iresnet("magface", 0.4), _small_iresnet("magface", 0.4, jnp.bfloat16)),
        (ir.IRNet((1, 1, 1, 1)), ir.IRNet((1, 1, 1, 1), dtype=jnp.bfloat16)),
    ]:
        variables = _random_variables(model32, x)
        abstract16 = jax.eval_shape(lambda m=model16: m.init(jax.random.key(0), x, train=False))
        dtypes = {leaf.dtype for leaf in jax.tree.leaves(abstract16)}
        assert dtypes == {jnp.dtype(jnp.float32)}
        out32 = jax.jit(lambda v, m=model32: m.apply(v, x, train=False))(variables)
        out16 = jax.jit(lambda v, m=model16: m.apply(v, x, train=False))(variables)
        assert out16.dtype == jnp.float32
        # Same parameters, bf16 trunk: close to float32 but not identical (bf16 really used).
        rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
        assert 0 < rel < 0.1, rel


def test_mbf_bf16_forward():
    model = models.build("mbf", dtype=jnp.bfloat16)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), _images(1), train=False))
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    out = jax.eval_shape(lambda v: model.apply(v, _images(2), train=False), variables)
    assert out.shape == (2, 512) and out.dtype == jnp.float32
    with pytest.raises(ValueError, match="no dropout"):
        models.build("mbf", dropout=0.2)


def _loss_grads(model, variables, x, **apply_kwargs):
    def loss(params):
        out, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
            **apply_kwargs,
        )
        return jnp.sum(out**3) + jnp.sum(out * jnp.arange(out.shape[-1]))

    return jax.grad(loss)(variables["params"])


def test_arcface_final_bn_scale_is_frozen():
    # The parameter starts at 1, as arcface_torch's constant_(features.weight, 1.0) ...
    bn = layers.batch_norm(
        False, eps=1e-5, torch_momentum=0.1, dtype=jnp.float32, name="f", frozen_scale=True
    )
    np.testing.assert_array_equal(
        bn.init(jax.random.key(0), jnp.ones((2, 8)))["params"]["scale"], 1
    )
    # ... and never receives a gradient in the full model.
    model = models.build("tiny")
    x = _images(4, size=32)
    variables = _random_variables(model, x)
    grads = jax.jit(lambda v: _loss_grads(model, v, x))(variables)
    assert np.all(np.asarray(grads["features"]["scale"]) == 0.0)
    assert np.any(np.asarray(grads["features"]["bias"]) != 0.0)
    assert np.any(np.asarray(grads["fc"]["kernel"]) != 0.0)
    mask = models.trainable_mask("tiny", variables["params"])
    flat = traverse_util.flatten_dict(mask)
    assert flat[("features", "scale")] is False
    assert sum(not v for v in flat.values()) == 1
    assert models.frozen_params("ir_50") == () and models.frozen_params("mbf") == ()


def test_magface_final_bn_scale_is_trainable():
    model = _small_iresnet("magface")
    x = _images(4, size=32)
    variables = _random_variables(model, x)
    grads = jax.jit(lambda v: _loss_grads(model, v, x, rngs={"dropout": jax.random.key(1)}))(
        variables
    )
    assert np.any(np.asarray(grads["features"]["scale"]) != 0.0)


def test_adaface_shortcut_structure():
    params = models.abstract_variables("ir_18")["params"]
    with_conv = sorted(
        int(name.split("_")[1])
        for name, sub in params.items()
        if name.startswith("body_") and "shortcut_layer_0" in sub
    )
    # Only the first unit of stages 2-4 changes width; stage 1 (64 -> 64, stride 2) max-pools.
    assert with_conv == [2, 4, 6]
    assert "output_layer_4" not in params  # BatchNorm1d(affine=False)
    # arcface_torch instead downsamples with conv1x1 + BN at every stage start.
    arc = models.abstract_variables("iresnet18")["params"]
    assert all("downsample_0" in arc[f"layer{s}_0"] for s in (1, 2, 3, 4))

    # Functionally: with the residual branch zeroed, a unit is MaxPool2d(1, 2) = subsampling.
    block = ir.BasicBlockIR(8, 8, 2)
    x = _images(2, size=8)[..., :1] * jnp.ones(8)
    variables = _random_variables(block, x)
    params = jax.tree.map(np.asarray, variables["params"])
    params["res_layer_5"] = {"scale": np.zeros(8), "bias": np.zeros(8)}
    out = block.apply({**variables, "params": params}, x, train=False)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x[:, ::2, ::2, :]))


def test_batchnorm_train_vs_inference():
    model = models.build("tiny")
    x = _images(6, size=32)  # any size works; 32x32 keeps the test fast
    variables = _random_variables(model, x)
    params = jax.tree.map(np.asarray, variables["params"])
    params["features"]["scale"] = np.ones(512, np.float32)
    stats = {"features": {"mean": np.zeros(512, np.float32), "var": np.ones(512, np.float32)}}
    variables = {"params": params, "batch_stats": {**variables["batch_stats"], **stats}}

    @jax.jit
    def train_apply(x):
        return model.apply(
            variables,
            x,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda mdl, _: mdl.name == "fc",
        )

    infer = jax.jit(lambda x: model.apply(variables, x, train=False))

    out, updates = train_apply(x)
    fc_out = np.asarray(updates["intermediates"]["fc"]["__call__"][0], np.float64)
    # Train mode normalises with the batch's own statistics: per-feature batch mean = bias,
    # biased batch variance = scale^2 = 1 (up to eps).
    out = np.asarray(out, np.float64)
    np.testing.assert_allclose(out.mean(0), params["features"]["bias"], atol=1e-5)
    var = fc_out.var(0)
    np.testing.assert_allclose(out.var(0), var / (var + 1e-5), rtol=1e-4)
    # Running statistics move by PyTorch momentum 0.1 (flax momentum 0.9) from (0, 1), the
    # variance with the unbiased batch estimate as PyTorch's.
    new = updates["batch_stats"]["features"]
    np.testing.assert_allclose(new["mean"], 0.1 * fc_out.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.9 + 0.1 * fc_out.var(0, ddof=1), rtol=1e-4)
    # Train-mode outputs of the first rows depend on the rest of the batch; inference ones don't.
    other = x.at[3:].set(_images(3, seed=1, size=32))
    assert not np.allclose(train_apply(other)[0][:3], out[:3], atol=1e-3)
    np.testing.assert_allclose(infer(other)[:3], infer(x)[:3], rtol=1e-5, atol=1e-5)
    assert not np.allclose(infer(x), out, atol=1e-3)
    # arcface_torch's default dropout is 0: training mode is deterministic without an rng.
    np.testing.assert_array_equal(train_apply(x)[0], out)


def test_magface_batchnorm_momentum_and_dropout():
    model = _small_iresnet("magface", 0.4)
    x = _images(4, size=32)
    variables = _random_variables(model, x)
    variables["batch_stats"]["features"]["mean"] = jnp.zeros(512)

    @jax.jit
    def train_apply(key):
        return model.apply(
            variables,
            x,
            train=True,
            mutable=["batch_stats", "intermediates"],
            rngs={"dropout": key},
            capture_intermediates=lambda mdl, _: mdl.name == "fc",
        )

    out1, updates = train_apply(jax.random.key(1))
    # MagFace's PyTorch momentum 0.9: running statistics move 90% towards the batch.
    fc_out = np.asarray(updates["intermediates"]["fc"]["__call__"][0], np.float64)
    new = updates["batch_stats"]["features"]
    np.testing.assert_allclose(new["mean"], 0.9 * fc_out.mean(0), rtol=1e-4, atol=1e-6)
    # Dropout 0.4 is active in training: it needs the "dropout" rng and depends on it.
    out2, _ = train_apply(jax.random.key(2))
    assert not np.allclose(out1, out2)
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda: model.apply(variables, x, train=True, mutable=["batch_stats"]))


def test_dropout_defaults():
    assert models.build("iresnet50").dropout == 0.0  # arcface_torch train_v2 default
    assert models.build("magface_iresnet18").dropout == 0.4
    assert models.build("ir_50").dropout == 0.4
    assert models.build("ir_50", dropout=0.0).dropout == 0.0


def test_batchnorm_statistics_are_global_under_data_parallel_jit():
    """The train step runs the backbone under plain jit with the batch sharded over ``data``:
    BatchNorm must see the global batch (as the single-device run does), not per-device shards."""
    devices = jax.devices()
    assert len(devices) == 8  # tests/conftest.py
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = jax.sharding.NamedSharding(mesh, jax.P("data"))
    model = models.build("tiny")
    x = _images(16, size=32)
    variables = _random_variables(model, x)

    @jax.jit
    def train_apply(variables, x):
        return model.apply(variables, x, train=True, mutable=["batch_stats"])

    single_out, single_stats = train_apply(variables, x)
    sharded_out, sharded_stats = train_apply(variables, jax.device_put(x, batch))
    assert len(sharded_out.sharding.device_set) == 8
    np.testing.assert_allclose(sharded_out, single_out, rtol=1e-4, atol=1e-4)
    for got, want in zip(
        jax.tree.leaves(sharded_stats), jax.tree.leaves(single_stats), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # Per-device statistics would give other outputs: the check above can tell them apart.
    per_device_out, _ = train_apply(variables, x[:2])
    assert not np.allclose(per_device_out, single_out[:2], atol=1e-2)
