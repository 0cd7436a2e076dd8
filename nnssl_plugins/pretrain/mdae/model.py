"""Time-conditioned ResEnc U-Net for MDAE.

Superset rule: `encoder` and `decoder` are the dynamic-network-architectures ResidualEncoderUNet's own
modules (same keys), so the checkpoint loads into a plain ResidualEncoderUNet. Method-only parts live
in `time_embed`, `film_encoder`, `film_decoder`. FiLM after every encoder and decoder stage:
h ← h · (γ(t) + 1) + β(t), with γ, β zero-initialised so training starts from the plain U-Net.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """t in [0, 1] → (B, dim); scaled by 1000 like DDPM timesteps so low frequencies resolve t."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class FiLM(nn.Module):
    def __init__(self, emb_dim: int, channels: int):
        super().__init__()
        self.proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * channels))
        nn.init.zeros_(self.proj[1].weight)
        nn.init.zeros_(self.proj[1].bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.proj(emb).to(h.dtype).chunk(2, dim=1)
        shape = (h.shape[0], h.shape[1]) + (1,) * (h.ndim - 2)
        return h * (gamma.view(shape) + 1) + beta.view(shape)


class MDAENetwork(nn.Module):
    def __init__(self, backbone: nn.Module, emb_dim: int = 256):
        super().__init__()
        self.encoder = backbone.encoder
        self.decoder = backbone.decoder
        self.emb_dim = emb_dim
        self.time_embed = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        enc_ch = list(self.encoder.output_channels)
        dec_ch = [enc_ch[-(s + 2)] for s in range(len(self.decoder.stages))]
        self.film_encoder = nn.ModuleList([FiLM(emb_dim, c) for c in enc_ch])
        self.film_decoder = nn.ModuleList([FiLM(emb_dim, c) for c in dec_ch])

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(sinusoidal_embedding(t, self.emb_dim))
        enc = self.encoder
        h = enc.stem(x) if enc.stem is not None else x
        skips = []
        for stage, film in zip(enc.stages, self.film_encoder):
            h = film(stage(h), emb)
            skips.append(h)
        dec = self.decoder
        h = skips[-1]
        for s, film in enumerate(self.film_decoder):
            h = dec.transpconvs[s](h)
            h = torch.cat((h, skips[-(s + 2)]), 1)
            h = film(dec.stages[s](h), emb)
        return dec.seg_layers[-1](h)
