"""MAE decoder pieces: fixed 3D sin-cos positional embedding, self-/cross-attention blocks,
and the mask-token scatter."""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, Mlp
from torch import nn

norm_layer = partial(nn.LayerNorm, eps=1e-6)


def sincos_pos_embed_3d(grid_size: Sequence[int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """[1, N, dim] fixed sin-cos embedding (as the official Hi-End-MAE code: per axis sin|cos of dim//6
    frequencies; any remainder channels are zero). Token order = C-order over the grid (Primus order)."""
    gx, gy, gz = [torch.arange(int(g), dtype=torch.float32) for g in grid_size]
    gx, gy, gz = torch.meshgrid(gx, gy, gz, indexing="ij")
    pos_dim = dim // 6
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / max(pos_dim, 1))
    parts = []
    for g in (gx, gy, gz):
        out = g.flatten()[:, None] * omega[None]
        parts += [torch.sin(out), torch.cos(out)]
    emb = torch.cat(parts, dim=1)
    if emb.shape[1] < dim:
        emb = torch.cat((emb, torch.zeros(emb.shape[0], dim - emb.shape[1])), dim=1)
    return emb[None]


def self_attention_block(dim: int, num_heads: int, mlp_ratio: float = 4.0) -> nn.Module:
    return Block(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).transpose(1, 2)
        k, v = self.kv(y).reshape(B, y.shape[1], 2, h, C // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class CrossAttentionBlock(nn.Module):
    """Official Hi-End-MAE decoder block (self_attn=True variant):
    x += SelfAttn(norm0(x)); x += CrossAttn(norm1(x), y); x += MLP(norm2(x)).
    x: decoder tokens (all positions); y: projected encoder features of visible tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, self_attn: bool = True):
        super().__init__()
        self.has_self_attn = self_attn
        if self_attn:
            self.norm0 = norm_layer(dim)
            self.self_attn = Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer).attn
        self.norm1 = norm_layer(dim)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.has_self_attn:
            x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), y)
        x = x + self.mlp(self.norm2(x))
        return x


def fill_mask_tokens(
    visible: torch.Tensor, keep_idx: torch.Tensor, num_tokens: int, mask_token: torch.Tensor
) -> torch.Tensor:
    """[B, K, D] visible tokens + learned mask token -> [B, N, D] in original token order."""
    B, K, D = visible.shape
    full = mask_token.to(visible.dtype).expand(B, num_tokens, D).clone()
    return full.scatter(1, keep_idx[:, :, None].expand(-1, -1, D), visible)


def init_mae_weights(module: nn.Module) -> None:
    """xavier-uniform Linear / unit LayerNorm, as the official MAE decoders."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
