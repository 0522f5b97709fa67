"""arcface_torch's Vision Transformers (``backbones/vit.py``), reimplemented from the
specification in issue 30 (the official code was read, not copied).

Architecture, for 112x112 RGB input:

* ``patch_embed.proj``: Conv2d(3 -> D, kernel 9, stride 9, bias) -> 12x12 = 144 tokens in
  row-major order (token = h * 12 + w, as PyTorch's ``proj(x).flatten(2).transpose(1, 2)``); no
  class token; plus the learned ``pos_embed`` (1, 144, D);
* token masking (training only, ``mask_ratio > 0``; see "the masking trap" below): per sample,
  uniform noise per token; the tokens with the smallest noise are kept, in the order of their
  noise (MAE's ``random_masking``);
* ``depth`` pre-norm blocks ``x + DropPath(Attention(LN(x)))``, ``x + DropPath(Mlp(LN(x)))``.
  Attention: ``qkv`` Linear(D, 3D, no bias) reshaped (B, N, 3, heads, D / heads), scale
  (D / heads) ** -0.5, softmax over the keys, ``proj`` Linear(D, D); Mlp: ``fc1`` Linear(D, 4D)
  -> ReLU6 -> ``fc2`` Linear(4D, D). LayerNorm eps 1e-5. No dropout (the official rates are 0);
  drop-path (stochastic depth) rates linear from 0 (first block) to ``drop_path_rate`` (last);
* final LayerNorm ``norm``; when masked, the dropped positions are filled with the learned
  ``mask_token`` (1, 1, D), *not* layer-normed, and the token order restored;
* embedding head on the flattened [B, 144 * D] tokens (token-major, no permutation between the
  frameworks): ``feature.0`` Linear(144 * D -> D, no bias) -> ``feature.1`` BatchNorm1d(D) ->
  ``feature.2`` Linear(D -> 512, no bias) -> ``feature.3`` BatchNorm1d(512); eps 2e-5, PyTorch
  momentum 0.1, affine and trainable. No pooling.

The masking trap (reproduced on purpose): the official ``forward_features`` calls
``self.random_masking(x)`` without passing ``self.mask_ratio``, so the default of that method,
0.1, applies: every arch with ``mask_ratio > 0`` masks 10% of the tokens (keeps
``int(144 * 0.9) = 129``), ``vit_b_dp005_mask_005``'s 0.05 included; ``mask_ratio`` only
switches masking on. Checkpoints trained that way are what users convert, so magjax trains the
same way (:data:`MASKED_FRACTION`).

Precision, as the official module's autocast regions (``dtype`` is the compute dtype, e.g.
bfloat16; parameters are float32): the four Linear layers of each block (``qkv``, ``proj``,
``fc1``, ``fc2``), ReLU6 and drop path run in ``dtype``. The rest runs in float32 (float64 for a
float64 model: ``promote_types(dtype, float32)``): the patch embedding (outside autocast
there), the residual stream (PyTorch adds the half-precision branch to the float32 stream in
float32), the LayerNorms (autocast runs ``layer_norm`` in float32), the attention scores, the
softmax and the product with V (an explicit ``autocast(False)`` island), the final LayerNorm
(``norm(x.float())``), the mask token and the embedding head, so the raw embedding is float32
as the ResNets'. On TPU, XLA's default precision for float32 matrix products is one bfloat16
pass; ``jax_default_matmul_precision`` raises it for every product at once.

Randomness (masking noise and drop-path draws) comes from the ``dropout`` RNG stream, which
``magjax.models.apply_train`` folds with the step, so a resumed run draws what the uninterrupted
one would. The masking noise is sown as ``intermediates/mask_noise`` (visible with
``mutable=["intermediates"]``) so the PyTorch side of a test can be fed the same noise.

Initialisation (the official ``_init_weights``): Linear weights truncated normal with std 0.02
(timm's ``trunc_normal_`` cuts at +-2 absolute, i.e. 100 std: in effect a plain normal), zero
Linear biases, LayerNorm 1 / 0, ``pos_embed`` truncated normal std 0.02, ``mask_token``
N(0, 0.02); the patch Conv2d and the BatchNorms keep PyTorch's defaults.

``remat``: each block is rematerialised in the backward pass (``nn.remat``), as the official
``using_checkpoint`` (``torch.utils.checkpoint`` per block) for B, L and H; the values are the
same, the activation memory one block's.

Module names mirror the PyTorch ``state_dict`` keys (``blocks.3.attn.qkv`` ->
``blocks_3/attn/qkv``, ``feature.1`` -> ``feature_1``) so that ``magjax.convert`` maps them by
rule; ``pos_embed`` and ``mask_token`` are raw parameters of the top module, keyed as such.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magjax.models.arch import Arch, Layout
from magjax.models.layers import TORCH_DEFAULT_KERNEL, batch_norm, torch_default_bias

Dtype = Any

# The fraction of tokens the official code masks whenever mask_ratio > 0 (module docstring).
MASKED_FRACTION = 0.1
LAYER_NORM_EPS = 1e-5
HEAD_BN_EPS = 2e-5
HEAD_BN_MOMENTUM = 0.1  # PyTorch's convention (weight of the new batch statistic)


def trunc_normal(std: float) -> nn.initializers.Initializer:
    """timm's ``trunc_normal_(std=std)``: N(0, std) cut at the absolute bounds -2 and 2."""

    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, dtype)

    return init


LINEAR_KERNEL = trunc_normal(0.02)


def island_dtype(dtype: Dtype) -> Dtype:
    """The dtype of the float32 islands: float32, or float64 for a float64 model."""
    return jnp.promote_types(dtype, jnp.float32)


def _dense(features: int, dtype: Dtype, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        kernel_init=LINEAR_KERNEL,
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
    # Two-pass variance as PyTorch (E[x^2] - E[x]^2 loses digits on the residual stream).
    return nn.LayerNorm(
        epsilon=LAYER_NORM_EPS,
        dtype=island_dtype(dtype),
        param_dtype=jnp.float32,
        use_fast_variance=False,
        name=name,
    )


class PatchEmbed(nn.Module):
    """``Conv2d(3, dim, patch, stride patch)`` -> tokens [B, (H / patch) * (W / patch), dim]."""

    dim: int
    patch: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        fan_in = self.patch * self.patch * images.shape[-1]
        x = nn.Conv(
            self.dim,
            (self.patch, self.patch),
            strides=(self.patch, self.patch),
            padding="VALID",
            kernel_init=TORCH_DEFAULT_KERNEL,
            bias_init=torch_default_bias(fan_in),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="proj",
        )(images)
        return x.reshape(x.shape[0], -1, self.dim)  # NHWC: token = h * W + w


class Attention(nn.Module):
    """Multi-head self-attention; scores, softmax and the product with V in float32."""

    dim: int
    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, _ = x.shape
        head_dim = self.dim // self.heads
        qkv = _dense(3 * self.dim, self.dtype, "qkv", use_bias=False)(x)
        qkv = qkv.astype(island_dtype(self.dtype)).reshape(batch, tokens, 3, self.heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # (q @ k^T) * scale, scaled after the product as the official code
        scores = jnp.einsum("bqhc,bkhc->bhqk", q, k) * head_dim**-0.5
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(batch, tokens, self.dim)
        return _dense(self.dim, self.dtype, "proj")(out)


class Mlp(nn.Module):
    """``fc1`` Linear(dim, hidden) -> ReLU6 -> ``fc2`` Linear(hidden, dim)."""

    dim: int
    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu6(_dense(self.hidden, self.dtype, "fc1")(x))
        return _dense(self.dim, self.dtype, "fc2")(x)


def drop_path(y: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """timm's ``DropPath``: per sample (first axis), 0 with probability ``rate``, else
    ``y / (1 - rate)``."""
    keep_prob = 1.0 - rate
    keep = jax.random.bernoulli(key, keep_prob, (y.shape[0],) + (1,) * (y.ndim - 1))
    return jnp.where(keep, y / keep_prob, jnp.zeros((), y.dtype))


class Block(nn.Module):
    """Pre-norm transformer block with drop path (stochastic depth) on both branches."""

    dim: int
    heads: int
    mlp_ratio: int
    drop_path: float
    dtype: Dtype = jnp.float32

    def _drop_path(self, y: jax.Array, train: bool) -> jax.Array:
        if not train or self.drop_path == 0.0:
            return y
        return drop_path(y, self.drop_path, self.make_rng("dropout"))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        # x is the float32 residual stream; the branches come back in dtype and are added in
        # float32 (jnp promotes), as PyTorch adds a half tensor to a float one.
        attn = Attention(self.dim, self.heads, self.dtype, name="attn")
        x = x + self._drop_path(attn(_layer_norm(self.dtype, "norm1")(x)), train)
        mlp = Mlp(self.dim, self.dim * self.mlp_ratio, self.dtype, name="mlp")
        return x + self._drop_path(mlp(_layer_norm(self.dtype, "norm2")(x)), train)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Per-block drop-path rates, ``torch.linspace(0, rate, depth)`` (block 0 gets 0)."""
    return [float(r) for r in np.linspace(0.0, rate, depth)]


class VisionTransformer(nn.Module):
    """arcface_torch's ``VisionTransformer``: NHWC images [B, 112, 112, 3] -> the raw float32
    embedding [B, embedding_dim] (module docstring)."""

    dim: int
    depth: int
    heads: int = 8
    patch: int = 9
    mlp_ratio: int = 4
    drop_path_rate: float = 0.0
    mask_ratio: float = 0.0
    remat: bool = False
    embedding_dim: int = 512
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        island = island_dtype(self.dtype)
        x = PatchEmbed(self.dim, self.patch, island, name="patch_embed")(images.astype(island))
        batch, tokens, _ = x.shape
        pos_embed = self.param("pos_embed", trunc_normal(0.02), (1, tokens, self.dim), jnp.float32)
        mask_token = self.param(
            "mask_token", nn.initializers.normal(0.02), (1, 1, self.dim), jnp.float32
        )
        x = x + pos_embed.astype(island)

        masking = train and self.mask_ratio > 0
        if masking:
            noise = jax.random.uniform(self.make_rng("dropout"), (batch, tokens), jnp.float32)
            self.sow("intermediates", "mask_noise", noise)
            ids_shuffle = jnp.argsort(noise, axis=1)  # ascending: the smallest noise is kept
            ids_restore = jnp.argsort(ids_shuffle, axis=1)
            keep = int(tokens * (1 - MASKED_FRACTION))  # not self.mask_ratio: the trap
            x = jnp.take_along_axis(x, ids_shuffle[:, :keep, None], axis=1)

        # train is static under remat (argument 2, counting self).
        block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        for index, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
            x = block(
                self.dim, self.heads, self.mlp_ratio, rate, self.dtype, name=f"blocks_{index}"
            )(x, train)
        x = _layer_norm(self.dtype, "norm")(x.astype(island))

        if masking:
            filler = jnp.broadcast_to(mask_token.astype(island), (batch, tokens - keep, self.dim))
            x = jnp.take_along_axis(
                jnp.concatenate([x, filler], axis=1), ids_restore[..., None], axis=1
            )
        x = x.reshape(batch, tokens * self.dim)

        def bn(name):
            return batch_norm(
                train, eps=HEAD_BN_EPS, torch_momentum=HEAD_BN_MOMENTUM, dtype=island, name=name
            )

        x = bn("feature_1")(_dense(self.dim, island, "feature_0", use_bias=False)(x))
        x = _dense(self.embedding_dim, island, "feature_2", use_bias=False)(x)
        return bn("feature_3")(x)


# name: (dim, depth, drop_path_rate, mask_ratio, remat), all patch 9, 8 heads, MLP ratio 4.
OFFICIAL = {
    "vit_t": (256, 12, 0.1, 0.1, False),
    "vit_t_dp005_mask0": (256, 12, 0.05, 0.0, False),
    "vit_s": (512, 12, 0.1, 0.1, False),
    "vit_s_dp005_mask_0": (512, 12, 0.05, 0.0, False),
    "vit_b": (512, 24, 0.1, 0.1, True),
    "vit_b_dp005_mask_005": (512, 24, 0.05, 0.05, True),
    "vit_l_dp005_mask_005": (768, 24, 0.05, 0.05, True),
    "vit_h": (1024, 48, 0.1, 0.0, True),
}
# magjax's CPU net (no official checkpoint): fast tests and the lockstep case.
DEMO = {"vit_demo": (64, 2, 0.0, 0.0, False)}


def _settings(name: str) -> dict:
    dim, depth, drop_path_rate, mask_ratio, remat = {**OFFICIAL, **DEMO}[name]
    return dict(
        dim=dim, depth=depth, drop_path_rate=drop_path_rate, mask_ratio=mask_ratio, remat=remat
    )


def _no_dropout(name: str, dropout: float | None) -> None:
    if dropout:
        raise ValueError(f"{name} has no dropout layer; got dropout={dropout}")


def _builder(name: str):
    def build(
        *, dtype: Dtype = jnp.float32, dropout: float | None = None, embedding_dim: int = 512
    ) -> VisionTransformer:
        _no_dropout(name, dropout)
        return VisionTransformer(**_settings(name), embedding_dim=embedding_dim, dtype=dtype)

    return build


def _torch_builder(name: str):
    def build(dropout: float | None = None):
        _no_dropout(name, dropout)
        from magjax.models import vit_torch  # imports torch

        settings = _settings(name)
        settings["using_checkpoint"] = settings.pop("remat")
        return vit_torch.VisionTransformer(**settings)

    return build


def onnx_graph(g: Any, x: str) -> str:
    """The ViT as ONNX nodes (``magjax.export``'s graph builder ``g``; input NCHW ``x``).

    Patch Conv -> Reshape/Transpose to [N, 144, D] tokens (token = h * 12 + w, as PyTorch) ->
    Add ``pos_embed``; per block LayerNormalization, the query, key and value projections as
    three MatMuls (rows 0:D, D:2D, 2D:3D of the fused ``qkv`` weight; the head_dim ** -0.5
    score scale folded into the query weight, in float64), per-head Reshape/Transpose, MatMul,
    Softmax, MatMul, ``proj``, residual Add; ``fc1``, Clip (ReLU6), ``fc2``, residual Add; the
    final LayerNormalization, the token-major flatten [N, 144 * D] and the two Linear layers
    with their BatchNorm1d folded in (Gemm). ``mask_token`` is used only by training.
    """
    x = g.conv(x, "patch_embed.proj")  # [N, D, 12, 12]
    x = g.reshape(x, [0, 0, -1], "patch_embed.flatten")  # [N, D, 144]
    x = g.transpose(x, [0, 2, 1], "patch_embed.tokens")  # [N, 144, D]
    x = g.add_tensor(x, "pos_embed")
    g.skip("mask_token")
    block = 0
    while g.has_prefix(p := f"blocks.{block}"):
        heads = g.settings[f"{p}.attn"]["heads"]
        qkv = g.take(f"{p}.attn.qkv.weight")  # (3D, D): rows [q | k | v], each head-major
        dim = qkv.shape[1]
        head_dim = dim // heads
        h = g.layer_norm(x, f"{p}.norm1")

        def split_heads(weight, name, perm, h=h, heads=heads, head_dim=head_dim):
            y = g.reshape(g.matmul(h, weight.T, name), [0, 0, heads, head_dim], f"{name}.heads")
            return g.transpose(y, perm, f"{name}.transpose")

        q = split_heads(qkv[:dim] * head_dim**-0.5, f"{p}.attn.q", [0, 2, 1, 3])  # [N,h,T,c]
        k = split_heads(qkv[dim : 2 * dim], f"{p}.attn.k", [0, 2, 3, 1])  # [N, h, c, T]
        v = split_heads(qkv[2 * dim :], f"{p}.attn.v", [0, 2, 1, 3])  # [N, h, T, c]
        scores = g.node("MatMul", [q, k], f"{p}.attn.scores")
        out = g.node("MatMul", [g.softmax(scores, f"{p}.attn.softmax"), v], f"{p}.attn.values")
        out = g.transpose(out, [0, 2, 1, 3], f"{p}.attn.merge")  # [N, T, h, c]
        out = g.reshape(out, [0, 0, dim], f"{p}.attn.concat")
        x = g.add(x, g.linear(out, f"{p}.attn.proj"), f"{p}.attn.residual")
        h = g.relu6(g.linear(g.layer_norm(x, f"{p}.norm2"), f"{p}.mlp.fc1"), f"{p}.mlp.act")
        x = g.add(x, g.linear(h, f"{p}.mlp.fc2"), f"{p}.mlp.residual")
        block += 1
    x = g.layer_norm(x, "norm")
    x = g.linear_bn(x, "feature.0", "feature.1")  # Flatten: [N, 144 * D], token-major
    return g.linear_bn(x, "feature.2", "feature.3", flatten=False)


ARCHS: tuple[Arch, ...] = tuple(
    Arch(
        name=name,
        family="arcface_torch",
        build=_builder(name),
        layout=Layout(embedding_norm=("feature_3",), onnx=onnx_graph),
        torch=_torch_builder(name),
        default_dropout=None,
        official=name in OFFICIAL,
        # Without masking, mask_token takes no part in training: train_v2.py's DDP leaves a
        # globally unused parameter's grad None, and torch's optimizers skip such parameters,
        # weight decay included (tests/test_lockstep.py's ViT case).
        frozen=(("mask_token",),) if _settings(name)["mask_ratio"] == 0 else (),
    )
    for name in (*OFFICIAL, *DEMO)
)
