"""Hi-End-MAE (Tang et al.; official code FengheTan9/Hi-End-MAE) on a Primus/Eva encoder.

Encoder: Primus `down_projection` + `eva` on the 25 % visible tokens only (random 75 % masking).
Decoder (`mae_decoder.*`), as the official `MAEViTDecoder` (self_depth=2, cross_depth=3, self_attn=True):
  x = query_proj(eva.norm(final visible tokens)) scattered with a learned mask token to all N positions
      + fixed 3D sin-cos decoder pos-embed
  x = 2 x self-attention Block(x)
  for k, layer in enumerate(attend_layers):        # official: 9, 6, 3 (0-based; blocks 10, 7, 4 1-based)
      x = CrossAttentionBlock_k(x, memory_projs[k](output of eva.blocks[layer] on visible tokens))
          # = x + SelfAttn(norm0 x); x + CrossAttn(norm1 x, memory); x + MLP(norm2 x)
  pred = head(norm(x))  -> [B, N, C * prod(patch)]
Memories are the raw (un-normalised) block outputs of the visible tokens, projected, without a
decoder pos-embed (as official). Loss: MSE on masked patches vs per-patch-normalised target.

Attended layers for shallow encoders: `default_attend_layers(depth)` = (9, 6, 3)-style quarter points
depth*3//4, depth//2, depth//4 for depth >= 12 (12 -> 9, 6, 3; 24 -> 18, 12, 6); for depth < 12 the
three blocks below the last one, top-down (4 -> 2, 1, 0), so the final (query) block is never duplicated.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.mae_common.decoder import (
    CrossAttentionBlock, fill_mask_tokens, init_mae_weights, norm_layer, self_attention_block, sincos_pos_embed_3d,
)
from nnssl_plugins.pretrain.mae_common.encoder import PrimusMAEBackbone
from nnssl_plugins.pretrain.mae_common.loss import masked_mse, patchify, reconstruction_volumes
from nnssl_plugins.pretrain.mae_common.masking import mask_to_indices, random_token_mask

DEFAULT_METHOD = dict(
    mask_ratio=0.75,
    decoder_embed_dim=528,
    decoder_num_heads=16,
    decoder_self_depth=2,
    decoder_mlp_ratio=4.0,
    attend_layers=None,  # None -> default_attend_layers(eva_depth); official 12 layers -> [9, 6, 3]
    norm_pix_loss=True,
)


def default_attend_layers(depth: int) -> List[int]:
    if depth >= 12:
        return [depth * 3 // 4, depth // 2, depth // 4]
    if depth < 2:
        raise UserInputError(f"eva_depth={depth}: Hi-End-MAE needs an encoder with at least 2 blocks.")
    return [i for i in (depth - 2, depth - 3, depth - 4) if i >= 0]


class HiEndDecoder(nn.Module):
    def __init__(self, encoder_dim: int, dim: int, num_heads: int, self_depth: int, num_cross: int,
                 grid_size: Sequence[int], out_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise UserInputError(f"decoder_embed_dim {dim} is not divisible by decoder_num_heads {num_heads}.")
        self.num_tokens = int(np.prod(grid_size))
        self.query_proj = nn.Linear(encoder_dim, dim)
        self.memory_projs = nn.ModuleList([nn.Linear(encoder_dim, dim) for _ in range(num_cross)])
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_3d(grid_size, dim), persistent=False)
        self.self_blocks = nn.ModuleList([self_attention_block(dim, num_heads, mlp_ratio) for _ in range(self_depth)])
        self.cross_blocks = nn.ModuleList(
            [CrossAttentionBlock(dim, num_heads, mlp_ratio, self_attn=True) for _ in range(num_cross)])
        self.norm = norm_layer(dim)
        self.head = nn.Linear(dim, out_dim)
        init_mae_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, memories: List[torch.Tensor], keep_idx: torch.Tensor) -> torch.Tensor:
        x = fill_mask_tokens(self.query_proj(latent), keep_idx, self.num_tokens, self.mask_token)
        x = x + self.pos_embed.to(x.dtype)
        for blk in self.self_blocks:
            x = blk(x)
        for blk, proj, mem in zip(self.cross_blocks, self.memory_projs, memories):
            x = blk(x, proj(mem))
        return self.head(self.norm(x))


class HiEndMAE(PrimusMAEBackbone):
    """state_dict = Primus encoder keys (down_projection.*, eva.*, mask_token) + mae_decoder.*"""

    def __init__(self, config: dict, input_channels: int):
        super().__init__(config["arch_kwargs"], input_channels,
                         up_projection_classes=(config.get("method") or {}).get("up_projection_classes"))
        m = dict(DEFAULT_METHOD)
        m.update(config.get("method", {}) or {})
        depth = len(self.eva.blocks)
        attend = m["attend_layers"] if m["attend_layers"] is not None else default_attend_layers(depth)
        attend = [int(i) for i in attend]
        if not attend or any(not 0 <= i < depth for i in attend):
            raise UserInputError(
                f"method['attend_layers']={attend}: must be non-empty 0-based encoder block indices < eva_depth "
                f"({depth}). Official for 12 blocks: [9, 6, 3]; default for depth {depth}: "
                f"{default_attend_layers(depth)}.")
        if not 0.0 <= float(m["mask_ratio"]) < 1.0:
            raise UserInputError(f"method['mask_ratio']={m['mask_ratio']}: must be in [0, 1).")
        self.attend_layers = attend
        self.mask_ratio = float(m["mask_ratio"])
        self.norm_pix_loss = bool(m["norm_pix_loss"])
        self.mae_decoder = HiEndDecoder(
            self.embed_dim, int(m["decoder_embed_dim"]), int(m["decoder_num_heads"]), int(m["decoder_self_depth"]),
            len(attend), self.grid_size, input_channels * int(np.prod(self.patch_size)),
            float(m["decoder_mlp_ratio"]))

    def forward(self, images: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """images [B, C, X, Y, Z]; keep_idx [B, K] visible tokens -> predicted patches [B, N, C*prod(patch)]."""
        latent, hidden = self.forward_encoder(images, keep_idx, return_layers=self.attend_layers)
        return self.mae_decoder(latent, [hidden[i] for i in self.attend_layers], keep_idx)


def build_model(config: dict, input_channels: int) -> HiEndMAE:
    return HiEndMAE(config, input_channels)


def compute_loss(model: HiEndMAE, images: torch.Tensor, generator: Optional[torch.Generator] = None,
                 return_pictures: bool = True) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """One Hi-End-MAE step's loss. Returns (loss, logs) with logs: loss, mask [B, N] (True = masked),
    pred [B, N, P], visible_tokens, and (if return_pictures) masked_image / reconstruction [B, C, X, Y, Z]."""
    model.check_input(images)
    B = images.shape[0]
    mask = random_token_mask(B, model.num_tokens, model.mask_ratio, generator, images.device)
    keep_idx, _ = mask_to_indices(mask)
    pred = model(images, keep_idx)
    target = patchify(images, model.patch_size)
    loss = masked_mse(pred, target, mask, model.norm_pix_loss)
    logs = {"loss": loss.detach(), "mask": mask, "pred": pred.detach(),
            "visible_tokens": torch.tensor(keep_idx.shape[1])}
    if return_pictures:
        logs["masked_image"], logs["reconstruction"] = reconstruction_volumes(
            images, pred, mask, model.patch_size, model.grid_size, model.norm_pix_loss)
    return loss, logs
