"""MAESIL (3D superpatch MAE with dual masking) on a Primus/Eva encoder.

Superpatch 128^3, 8^3 tokens (4096). Encoder = Primus `down_projection` (conv patch embed) + `eva`
(abs. pos-embed + rope) on visible tokens only. Decoder (`mae_decoder.*`, standard MAE decoder; the paper
gives no decoder size, we use MAE's 512-d, 8 blocks, 16 heads): Linear(enc->dec) of visible tokens,
learned mask token at masked positions (original order), fixed 3D sin-cos pos-embed, self-attention
blocks, LayerNorm, Linear -> C * 8^3 voxels per token. Loss: MSE on masked tokens (raw intensities,
norm_pix_loss=False by default, so PSNR/SSIM of reconstructions are meaningful).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.mae_common.decoder import (
    fill_mask_tokens, init_mae_weights, norm_layer, self_attention_block, sincos_pos_embed_3d,
)
from nnssl_plugins.pretrain.mae_common.encoder import PrimusMAEBackbone
from nnssl_plugins.pretrain.mae_common.loss import masked_mse, patchify, reconstruction_volumes
from nnssl_plugins.pretrain.mae_common.masking import mask_to_indices
from nnssl_plugins.pretrain.maesil.masking import dual_mask
from nnssl_plugins.pretrain.mae_common.metrics import psnr, ssim3d

DEFAULT_METHOD = dict(
    plane_mask_ratio=0.75,
    axis_mask_ratio=0.5,
    si_axis=0,  # default S-I axis of the preprocessed array if the caller passes none (see find_si_axis)
    decoder_embed_dim=512,
    decoder_depth=8,
    decoder_num_heads=16,
    decoder_mlp_ratio=4.0,
    norm_pix_loss=False,
)


class MAEDecoder(nn.Module):
    def __init__(self, encoder_dim: int, dim: int, depth: int, num_heads: int, grid_size: Sequence[int],
                 out_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise UserInputError(f"decoder_embed_dim {dim} is not divisible by decoder_num_heads {num_heads}.")
        self.num_tokens = int(np.prod(grid_size))
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_3d(grid_size, dim), persistent=False)
        self.blocks = nn.ModuleList([self_attention_block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = norm_layer(dim)
        self.head = nn.Linear(dim, out_dim)
        init_mae_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        x = fill_mask_tokens(self.embed(latent), keep_idx, self.num_tokens, self.mask_token)
        x = x + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


class MAESIL(PrimusMAEBackbone):
    """state_dict = Primus encoder keys (down_projection.*, eva.*, mask_token) + mae_decoder.*"""

    def __init__(self, config: dict, input_channels: int):
        super().__init__(config["arch_kwargs"], input_channels,
                         up_projection_classes=(config.get("method") or {}).get("up_projection_classes"))
        m = dict(DEFAULT_METHOD)
        m.update(config.get("method", {}) or {})
        for k in ("plane_mask_ratio", "axis_mask_ratio"):
            if not 0.0 <= float(m[k]) < 1.0:
                raise UserInputError(f"method['{k}']={m[k]}: must be in [0, 1).")
        self.plane_mask_ratio = float(m["plane_mask_ratio"])
        self.axis_mask_ratio = float(m["axis_mask_ratio"])
        self.default_si_axis = int(m["si_axis"])
        self.norm_pix_loss = bool(m["norm_pix_loss"])
        self.mae_decoder = MAEDecoder(
            self.embed_dim, int(m["decoder_embed_dim"]), int(m["decoder_depth"]), int(m["decoder_num_heads"]),
            self.grid_size, input_channels * int(np.prod(self.patch_size)), float(m["decoder_mlp_ratio"]))

    def forward(self, images: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        latent, _ = self.forward_encoder(images, keep_idx)
        return self.mae_decoder(latent, keep_idx)


def build_model(config: dict, input_channels: int) -> MAESIL:
    return MAESIL(config, input_channels)


def compute_loss(model: MAESIL, images: torch.Tensor, generator: Optional[torch.Generator] = None,
                 si_axis: Union[int, Sequence[int], None] = None, return_pictures: bool = True
                 ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Dual-masked MAE loss. si_axis: S-I spatial axis of `images` (int or one per sample; from
    `find_si_axis(properties['sitk_stuff']['direction'], plans['transpose_forward'])`), default
    method['si_axis']. Returns (loss, logs) like Hi-End-MAE's compute_loss."""
    model.check_input(images)
    B = images.shape[0]
    si = model.default_si_axis if si_axis is None else si_axis
    mask = dual_mask(B, model.grid_size, si, model.plane_mask_ratio, model.axis_mask_ratio, generator,
                     images.device)
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


@torch.no_grad()
def reconstruction_metrics(images: torch.Tensor, reconstruction: torch.Tensor,
                           data_range: Optional[float] = None) -> Dict[str, float]:
    """PSNR and 3D SSIM of a reconstruction [B, C, X, Y, Z] vs the input (data_range default: input
    max - min; for CT scaled to [0, 1] pass 1.0)."""
    if data_range is None:
        data_range = float(images.max() - images.min()) or 1.0
    return {"psnr": float(psnr(reconstruction, images, data_range)),
            "ssim": float(ssim3d(reconstruction, images, data_range))}
