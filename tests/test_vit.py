"""arcface_torch's ViT family (magjax.models.vit): sizes, state_dict layout, float64 forward
equality with the PyTorch definition (eval mode, and training mode with the same masking
noise), the masking trap, drop path, rematerialisation and the bfloat16 float32 islands.

Compute runs on ``vit_demo``-sized nets (2 blocks, width 64); the official sizes are only
traced (``jax.eval_shape``) or built on PyTorch's meta device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magjax import convert, models
from magjax.errors import UserError
from magjax.models import vit

torch = pytest.importorskip("torch")

OFFICIAL = (
    "vit_t",
    "vit_t_dp005_mask0",
    "vit_s",
    "vit_s_dp005_mask_0",
    "vit_b",
    "vit_b_dp005_mask_005",
    "vit_l_dp005_mask_005",
    "vit_h",
)


def _images(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, *models.INPUT_SHAPE))


def _nchw(images: np.ndarray, dtype=torch.float64) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(dtype)


def _randomised_torch(arch: str, seed: int = 0):
    """The PyTorch module of ``arch`` in float64 with every tensor random (biases, norm
    weights and running statistics included, which the official init leaves at 0 and 1)."""
    module = models.arch_spec(arch).torch(None).double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var") or (name.endswith(".weight") and tensor.ndim == 1):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            else:
                tensor.copy_(0.05 * torch.randn(tensor.shape, generator=generator))
    return module


def _flax_variables(module, arch: str) -> dict:
    # num_batches_tracked is dropped on reading a checkpoint (convert.backbone_state_dict)
    state = {
        k: v.numpy()
        for k, v in module.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    return jax.tree.map(jnp.asarray, convert.convert_state_dict(state, arch, np.float64))


def _formula_params(
    dim: int, depth: int, tokens: int = 144, patch: int = 9, embedding: int = 512
) -> int:
    """The parameter count from the architecture, in float64 (exact below 2**53)."""
    d = np.float64(dim)
    block = 2 * 2 * d + 3 * d * d + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    total = (patch * patch * 3 * d + d) + tokens * d + d + depth * block + 2 * d
    total += tokens * d * d + 2 * d + d * embedding + 2 * embedding
    return int(total)


def test_parameter_counts_match_arcface_torch():
    # The official figures (arcface_torch's model table) for T and S ...
    assert models.count_params("vit_t") == 19_137_792
    assert models.count_params("vit_s") == 76_023_296
    # ... and the formula for the others (the variants share their base's shapes).
    for arch, dim, depth in (
        ("vit_b", 512, 24),
        ("vit_l_dp005_mask_005", 768, 24),
        ("vit_h", 1024, 48),
    ):
        assert models.count_params(arch) == _formula_params(dim, depth), arch
    assert _formula_params(256, 12) == 19_137_792
    # The PyTorch definitions have the same sizes (built on the meta device: no memory).
    with torch.device("meta"):
        for arch in OFFICIAL:
            module = models.arch_spec(arch).torch(None)
            dim, depth = vit.OFFICIAL[arch][:2]
            assert sum(p.numel() for p in module.parameters()) == _formula_params(dim, depth)


def test_registry_entries():
    assert set(OFFICIAL) | {"vit_demo"} <= set(models.ARCHS)
    assert "vit_demo" in models.DEMO_ARCHS and not set(OFFICIAL) & set(models.DEMO_ARCHS)
    for arch in (*OFFICIAL, "vit_demo"):
        assert models.family(arch) == "arcface_torch"
    assert models.input_spec("vit_t") == {"channel_order": "RGB", "mean": 0.5, "std": 0.5}
    # Settings of the official table: (dim, depth, drop path, mask ratio, checkpointing).
    built = {arch: models.build(arch) for arch in OFFICIAL}
    assert {
        arch: (m.dim, m.depth, m.drop_path_rate, m.mask_ratio, m.remat) for arch, m in built.items()
    } == {
        "vit_t": (256, 12, 0.1, 0.1, False),
        "vit_t_dp005_mask0": (256, 12, 0.05, 0.0, False),
        "vit_s": (512, 12, 0.1, 0.1, False),
        "vit_s_dp005_mask_0": (512, 12, 0.05, 0.0, False),
        "vit_b": (512, 24, 0.1, 0.1, True),
        "vit_b_dp005_mask_005": (512, 24, 0.05, 0.05, True),
        "vit_l_dp005_mask_005": (768, 24, 0.05, 0.05, True),
        "vit_h": (1024, 48, 0.1, 0.0, True),
    }
    assert all((m.heads, m.patch, m.mlp_ratio) == (8, 9, 4) for m in built.values())
    with pytest.raises(UserError, match="no dropout layer"):
        models.build("vit_t", dropout=0.1)


@pytest.mark.parametrize("arch", ["vit_demo", "vit_t"])
def test_state_dict_keys_and_shapes_match_pytorch(arch):
    module = models.arch_spec(arch).torch(None)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    abstract = models.abstract_variables(arch)
    variables = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), abstract)
    state = convert.to_state_dict(variables, arch)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert "pos_embed" in expected and "mask_token" in expected and "norm.weight" in expected


def test_forward_matches_pytorch_in_float64(x64):
    module = _randomised_torch("vit_demo").eval()
    variables = _flax_variables(module, "vit_demo")
    images = _images(4)
    model = models.build("vit_demo", dtype=jnp.float64)
    ours = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(images))
    with torch.no_grad():
        theirs = module(_nchw(images)).numpy()
    assert ours.dtype == jnp.float64
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-10 * np.abs(theirs).max())
    assert np.abs(theirs).std() > 0.1  # a real signal, not a collapse to the BN bias


def test_masked_training_forward_matches_pytorch_in_float64(x64):
    """Training mode with masking on (ratio 0.05, as vit_b_dp005_mask_005: the official code
    masks 10% anyway), the PyTorch module fed the Flax noise: same embeddings and same
    BatchNorm running statistics."""
    module = _randomised_torch("vit_demo", seed=1).train()
    module.mask_ratio = 0.05
    variables = _flax_variables(module, "vit_demo")
    model = models.build("vit_demo", dtype=jnp.float64).clone(mask_ratio=0.05)
    images = _images(6, seed=1)
    ours, updates = jax.jit(
        lambda v, x: model.apply(
            v,
            x,
            train=True,
            mutable=["batch_stats", "intermediates"],
            rngs={"dropout": jax.random.key(3)},
        )
    )(variables, jnp.asarray(images))
    noise = np.asarray(updates["intermediates"]["mask_noise"][0])
    assert noise.shape == (6, 144)
    with torch.no_grad():
        theirs = module(_nchw(images), noise=torch.from_numpy(noise.copy())).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-10 * np.abs(theirs).max())
    for name in ("feature_1", "feature_3"):
        bn = module.feature[int(name[-1])]
        for ours_stat, theirs_stat in (("mean", bn.running_mean), ("var", bn.running_var)):
            np.testing.assert_allclose(
                updates["batch_stats"][name][ours_stat], theirs_stat.numpy(), rtol=1e-10, atol=1e-12
            )
    # Masking changed the output: the same call in eval mode differs.
    with torch.no_grad():
        assert not np.allclose(module.eval()(_nchw(images)).numpy(), theirs, rtol=1e-3)


@pytest.fixture(scope="module")
def demo_variables():
    """vit_demo float32 variables, every tensor random (from the PyTorch module: initialising
    in Flax would compile every initialiser)."""
    module = _randomised_torch("vit_demo", seed=2)
    state = {
        k: v.numpy()
        for k, v in module.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    return convert.convert_state_dict(state, "vit_demo", np.float32)


def test_masking_fills_the_official_ten_percent_with_the_mask_token(demo_variables):
    """mask_ratio 0.05 (vit_b_dp005_mask_005) masks what the official code masks for any ratio
    > 0: 144 - int(144 * 0.9) = 15 token rows per sample equal the (not layer-normed) mask
    token, at the 15 positions of largest noise; 0.05 itself would give 8."""
    model = models.build("vit_demo").clone(mask_ratio=0.05)
    images = jnp.asarray(_images(3), jnp.float32)

    @jax.jit
    def head_input(variables, images, key):
        captured = []

        def record(call, args, kwargs, context):
            if context.module.name == "feature_0":
                captured.append(args[0])
            return call(*args, **kwargs)

        with nn.intercept_methods(record):
            _, updates = model.apply(
                variables,
                images,
                train=True,
                rngs={"dropout": key},
                mutable=["batch_stats", "intermediates"],
            )
        return captured[0].reshape(3, 144, model.dim), updates["intermediates"]["mask_noise"][0]

    tokens, noise = head_input(demo_variables, images, jax.random.key(1))
    mask_token = demo_variables["params"]["mask_token"][0, 0]
    masked = np.all(np.asarray(tokens) == mask_token, axis=-1)
    largest_noise = np.argsort(np.asarray(noise), axis=1)[:, 129:]
    for row in range(3):
        assert masked[row].sum() == 15
        assert set(np.flatnonzero(masked[row])) == set(largest_noise[row])
    assert len({tuple(np.flatnonzero(m)) for m in masked}) == 3  # per sample
    # No masking in evaluation mode, nor with mask_ratio 0 (vit_t_dp005_mask0) in training:
    # nothing sown, and no RNG needed (eval_shape raises if one is drawn).
    for masking_off, train in ((model, False), (model.clone(mask_ratio=0.0), True)):
        _, updates = jax.eval_shape(
            lambda v, m=masking_off, t=train: m.apply(
                v, images, train=t, mutable=["batch_stats", "intermediates"]
            ),
            demo_variables,
        )
        assert "intermediates" not in updates


def test_drop_path_scales_or_zeroes_whole_samples():
    y = jnp.asarray(np.random.default_rng(0).normal(size=(4000, 3, 2)), jnp.float32)
    out = np.asarray(vit.drop_path(y, 0.25, jax.random.key(0)))
    kept = np.all(out == np.asarray(y / 0.75), axis=(1, 2))
    dropped = np.all(out == 0, axis=(1, 2))
    assert np.all(kept | dropped)
    assert abs(kept.mean() - 0.75) < 4 * np.sqrt(0.75 * 0.25 / 4000)


def test_drop_path_rates_are_linear_over_the_blocks_as_in_pytorch():
    model = vit.VisionTransformer(dim=16, depth=5, heads=2, drop_path_rate=0.1)
    rates = []

    def record(call, args, kwargs, context):
        if isinstance(context.module, vit.Block) and context.method_name == "__call__":
            rates.append(context.module.drop_path)
        return call(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(
            lambda x: model.init(jax.random.key(0), x, train=False),
            jax.ShapeDtypeStruct((1, *models.INPUT_SHAPE), jnp.float32),
        )
    np.testing.assert_allclose(rates, [0.0, 0.025, 0.05, 0.075, 0.1], rtol=1e-7)
    with torch.device("meta"):
        module = models.arch_spec("vit_b_dp005_mask_005").torch(None)
    torch_rates = [getattr(block.drop_path, "p", 0.0) for block in module.blocks]
    np.testing.assert_allclose(vit.drop_path_rates(0.05, 24), torch_rates, rtol=1e-6)
    assert isinstance(module.blocks[0].drop_path, torch.nn.Identity)


def _primitives(jaxpr) -> list[tuple[str, str]]:
    """(primitive, output dtype) of every equation in ``jaxpr`` and the jaxprs inside it."""
    found = []
    for eqn in jaxpr.eqns:
        found += [(eqn.primitive.name, str(var.aval.dtype)) for var in eqn.outvars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _primitives(inner)
    return found


def test_remat_gives_the_same_values_and_gradients(demo_variables):
    """Per-block rematerialisation (vit_b/l/h) changes memory, not values: same embeddings and
    gradients in training mode, masking and drop path drawing the same randomness."""
    plain = models.build("vit_demo").clone(drop_path_rate=0.5, mask_ratio=0.1)
    images = jnp.asarray(_images(4), jnp.float32)
    target = jnp.asarray(np.random.default_rng(2).normal(size=(4, 512)), jnp.float32)

    def loss(model, params):
        out, _ = model.apply(
            {**demo_variables, "params": params},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(5)},
        )
        return jnp.sum((out - target) ** 2), out

    results = {}
    for remat in (False, True):
        model = plain.clone(remat=remat)
        grad_fn = jax.value_and_grad(lambda p, m=model: loss(m, p), has_aux=True)
        results[remat] = jax.jit(grad_fn)(demo_variables["params"])
        jaxpr = jax.make_jaxpr(grad_fn)(demo_variables["params"])
        assert bool({"checkpoint", "remat2"} & {p for p, _ in _primitives(jaxpr)}) == remat
    (value, out), grads = results[False]
    (value_r, out_r), grads_r = results[True]
    np.testing.assert_allclose(out_r, out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value_r, value, rtol=1e-5)
    # feature_1's bias gets a zero gradient up to rounding (the training-mode BatchNorm of
    # feature_3 removes any constant shift), hence an absolute tolerance on the global scale.
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
    for (path, g), g_r in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_r), strict=True
    ):
        np.testing.assert_allclose(
            g_r, g, rtol=1e-4, atol=1e-6 * scale, err_msg=jax.tree_util.keystr(path)
        )


def test_bfloat16_compute_keeps_the_float32_islands(demo_variables):
    images = jnp.asarray(_images(4), jnp.float32)
    model16 = models.build("vit_demo", dtype=jnp.bfloat16)
    out32, out16 = (
        jax.jit(lambda v, m=m: m.apply(v, images, train=False))(demo_variables)
        for m in (models.build("vit_demo"), model16)
    )
    assert out16.dtype == jnp.float32
    # bfloat16 (8-bit mantissa, rounding 2**-9 = 2e-3) in the blocks' Linear layers only:
    # measured 1.5e-3 relative to the float32 embedding.
    error = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert 1e-4 < error < 1e-2, error
    computed = _primitives(
        jax.make_jaxpr(lambda v: model16.apply(v, images, train=False))(demo_variables).jaxpr
    )
    products = [dtype for primitive, dtype in computed if primitive == "dot_general"]
    depth = model16.depth
    # qkv, proj, fc1, fc2 per block in bfloat16; scores, weights @ V and the head's two
    # Linear layers in float32.
    assert products.count("bfloat16") == 4 * depth
    assert products.count("float32") == 2 * depth + 2
    # The softmax (exp) and the LayerNorms (rsqrt) never run in bfloat16.
    for primitive in ("exp", "rsqrt", "reduce_max"):
        dtypes = {dtype for p, dtype in computed if p == primitive}
        assert dtypes == {"float32"}, (primitive, dtypes)
