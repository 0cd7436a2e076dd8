"""Primus encoder that runs on visible tokens only.

`PrimusMAEBackbone` builds a real dynamic-network-architectures `Primus` and keeps its encoder
submodules under Primus's attribute names (`down_projection`, `eva`, `mask_token` buffer,
`register_tokens` if any), so `state_dict()` of any subclass contains every downstream Primus key
except the segmentation decoder `up_projection.*`.

Visible-only forward (what Eva would do with patch_drop, done explicitly and batch-correct):
  tokens = down_projection(x) -> [B, N, C] (Primus order "b c w h d -> b (w h d) c")
  [register tokens prepended] + eva.pos_embed (absolute, covers prefix + all N tokens)
  -> gather the visible tokens (keep_idx) *before* the blocks
  -> rotary embedding table eva.rope.get_embed() [N, D] gathered with the same keep_idx -> [B, 1, K, D]
     (EvaAttention applies rope to q/k of the non-prefix tokens; the head dim broadcasts)
  -> eva.blocks -> eva.norm.
Note: dynamic_network_architectures' own Eva patch_drop path passes a [B, K, D] rope table that does not
broadcast against [B, heads, K, d] for B > 1; that is why we do not use it.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from dynamic_network_architectures.architectures.primus import Primus
from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.mae_common.config import validate_arch_kwargs


class PrimusMAEBackbone(nn.Module):
    def __init__(self, arch_kwargs: dict, input_channels: int, up_projection_classes: Optional[int] = None):
        """up_projection_classes: if set, keep Primus's (untrained) segmentation decoder `up_projection` built
        for that many output channels, so the state dict holds *every* key of the downstream Primus and stock
        `-pretrained_weights` finds no missing key. Its conv shapes depend on the class count (PatchDecode's
        channel schedule), so it must equal the downstream `num_segmentation_heads`. Never used in forward."""
        super().__init__()
        validate_arch_kwargs(arch_kwargs)
        kw = dict(arch_kwargs)
        kw["patch_embed_size"] = tuple(int(i) for i in kw["patch_embed_size"])
        kw["input_shape"] = tuple(int(i) for i in kw["input_shape"])
        primus = Primus(input_channels=input_channels, num_classes=int(up_projection_classes or 1), **kw)
        self.input_channels = int(input_channels)
        self.embed_dim = primus.embed_dim
        self.patch_size = kw["patch_embed_size"]
        self.input_shape = kw["input_shape"]
        self.grid_size = tuple(s // p for s, p in zip(self.input_shape, self.patch_size))
        self.num_tokens = int(self.grid_size[0] * self.grid_size[1] * self.grid_size[2])
        # same attribute names as Primus -> same state-dict keys
        self.down_projection = primus.down_projection
        self.eva = primus.eva
        self.register_buffer("mask_token", primus.mask_token.detach().clone())  # Primus's (unused) zero buffer
        self.register_tokens = primus.register_tokens
        # nnssl AdaptationPlan fields (as on Primus)
        self.key_to_encoder = "eva"
        self.key_to_stem = "down_projection"
        self.keys_to_in_proj = ("down_projection.proj",)
        self.key_to_lpe = "eva.pos_embed"
        self.up_projection_classes = None if up_projection_classes is None else int(up_projection_classes)
        if up_projection_classes is not None:
            self.up_projection = primus.up_projection  # downstream decoder: present for key transfer, untrained
        del primus

    @property
    def num_prefix(self) -> int:
        return 0 if self.register_tokens is None else int(self.register_tokens.shape[1])

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5:
            raise UserInputError(
                f"input of shape {tuple(x.shape)}: MAE pretraining expects 3D data [B, C, X, Y, Z]; 2D data is "
                "not supported. Use a 3d_fullres configuration."
            )
        if x.shape[1] != self.input_channels or tuple(x.shape[2:]) != tuple(self.input_shape):
            raise UserInputError(
                f"input of shape {tuple(x.shape)} does not match the model (channels {self.input_channels}, "
                f"patch size {list(self.input_shape)}). Set arch_kwargs['input_shape'] to the training patch size."
            )

    def forward_encoder(
        self, x: torch.Tensor, keep_idx: Optional[torch.Tensor], return_layers: Iterable[int] = ()
    ) -> Tuple[torch.Tensor, Dict[int, torch.Tensor]]:
        """Encode visible tokens only.

        x: [B, C, X, Y, Z]; keep_idx: [B, K] long indices of visible tokens (None = all tokens).
        Returns (eva.norm(last block output) [B, K, C], {layer: output of eva.blocks[layer] [B, K, C]}),
        both without register tokens. Only K tokens (+ registers) ever enter the Eva blocks.
        """
        self.check_input(x)
        tok = rearrange(self.down_projection(x), "b c w h d -> b (w h d) c")
        B, N, C = tok.shape
        npf = self.num_prefix
        eva = self.eva
        if npf:
            tok = torch.cat((self.register_tokens.expand(B, -1, -1), tok), dim=1)
        if eva.pos_embed is not None:
            tok = tok + eva.pos_embed
        tok = eva.pos_drop(tok)
        rope = eva.rope.get_embed() if eva.rope is not None else None  # [N, D]
        prefix, tok = tok[:, :npf], tok[:, npf:]
        if keep_idx is not None:
            keep_idx = keep_idx.to(tok.device)
            tok = torch.gather(tok, 1, keep_idx[:, :, None].expand(-1, -1, C))
            if rope is not None:
                rope = rope.to(tok.device)[keep_idx][:, None]  # [B, 1, K, D]
        h = torch.cat((prefix, tok), dim=1) if npf else tok
        return_layers = set(int(i) for i in return_layers)
        hidden: Dict[int, torch.Tensor] = {}
        for i, blk in enumerate(eva.blocks):
            if eva.grad_checkpointing and self.training and not torch.jit.is_scripting():
                h = checkpoint(blk, h, rope=rope, use_reentrant=False)
            else:
                h = blk(h, rope=rope)
            if i in return_layers:
                hidden[i] = h[:, npf:]
        h = eva.norm(h)
        return h[:, npf:], hidden
