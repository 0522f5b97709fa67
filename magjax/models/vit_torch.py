"""arcface_torch's ``VisionTransformer`` in PyTorch, written from the specification (issue 30;
``magjax.models.vit``'s docstring), with exactly the official ``state_dict`` keys.

It is the PyTorch side of the ViT parity tests and of ``python -m magjax.bench backbone``, and
writes checkpoints in the official layout for the conversion tests. It runs in the dtype of its
parameters (float32, or float64 after ``.double()``); the attention scores, softmax and product
with V, and the final LayerNorm, run in at least float32 (``promote_types(dtype, float32)``,
where the official code calls ``.float()``, which would round a float64 model). The official
CUDA autocast regions are not reproduced here (the Flax module reproduces them).

The forward semantics are the official ones, the masking trap included: with ``mask_ratio > 0``
a training forward masks ``MASKED_FRACTION`` = 10% of the tokens whatever the ratio.
``forward(x, noise=None)``: ``noise`` [B, num_patches], when given, replaces ``torch.rand`` in
the masking, so a test can feed both frameworks the same noise. Token order is taken with a
stable argsort (the official one is not; they differ only on tied noise values).
Importing this module needs torch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from magjax.models.vit import MASKED_FRACTION


def _island(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``DropPath``): 0 with probability ``p``, else
    ``x / (1 - p)``; identity in evaluation mode."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep_prob = 1.0 - self.p
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x.div(keep_prob) * keep


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).to(_island(x.dtype))  # each [B, heads, N, d]
        weights = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(out.to(self.proj.weight.dtype))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int, image_size: int = 112):
        super().__init__()
        self.num_patches = (image_size // patch) ** 2
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # token = h * W + w


class VisionTransformer(nn.Module):
    """NCHW images [B, 3, 112, 112] -> the raw embedding [B, embedding_dim]."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int = 8,
        patch: int = 9,
        mlp_ratio: int = 4,
        drop_path_rate: float = 0.0,
        mask_ratio: float = 0.0,
        using_checkpoint: bool = False,
        embedding_dim: int = 512,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(dim, patch)
        self.num_patches = self.patch_embed.num_patches
        self.dim = dim
        self.mask_ratio = mask_ratio
        self.using_checkpoint = using_checkpoint
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        # On the CPU even when built on the meta device: the rates are Python numbers.
        rates = [r.item() for r in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, rate) for rate in rates])
        self.norm = nn.LayerNorm(dim)
        self.feature = nn.Sequential(
            nn.Linear(dim * self.num_patches, dim, bias=False),
            nn.BatchNorm1d(dim, eps=2e-5),
            nn.Linear(dim, embedding_dim, bias=False),
            nn.BatchNorm1d(embedding_dim, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def random_masking(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        """Keeps the ``int(L * 0.9)`` tokens of smallest noise (in noise order); returns them
        and ``ids_restore``, the permutation that puts the tokens back."""
        batch, tokens, dim = x.shape
        keep = int(tokens * (1 - MASKED_FRACTION))
        if noise is None:
            noise = torch.rand(batch, tokens, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1, stable=True)
        ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
        kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, dim))
        return kept, ids_restore

    def forward_features(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        batch = x.shape[0]
        x = self.patch_embed(x) + self.pos_embed
        masking = self.training and self.mask_ratio > 0
        if masking:
            x, ids_restore = self.random_masking(x, noise)  # the ratio is never passed
        for block in self.blocks:
            if self.using_checkpoint and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x.to(_island(x.dtype)))
        if masking:
            filler = self.mask_token.to(x.dtype).expand(batch, self.num_patches - x.shape[1], -1)
            x = torch.cat([x, filler], dim=1)
            x = torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, self.dim))
        return x.reshape(batch, self.num_patches * self.dim)

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.feature(self.forward_features(x, noise))
