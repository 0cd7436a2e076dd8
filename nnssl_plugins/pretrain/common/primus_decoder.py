"""A Primus decoder for token sizes that are not powers of two (e.g. Hi-End-MAE's official 12³ patches).

dynamic-network-architectures' `PatchDecode` upsamples with stride-2 transposed convolutions only
("patch size must be 2^x"), so a 12³ token grid decodes to 4× instead of 12× and the output has the wrong
size. This module keeps PatchDecode's design (transposed conv → norm → GELU per stage, channel width shrinking
geometrically to the class count) but factorises each axis' patch size into primes (12 = 3·2·2), one factor
per stage. Encoder keys are untouched, so pretrained weights load as usual; only `up_projection` differs.
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
from dynamic_network_architectures.building_blocks.patch_encode_decode import LayerNormNd
from torch import nn


def _prime_factors(n: int) -> List[int]:
    out, f = [], 2
    while n > 1:
        while n % f == 0:
            out.append(f)
            n //= f
        f += 1
    return out


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


class FactorizedPatchDecode(nn.Module):
    def __init__(self, patch_size: Sequence[int], embed_dim: int, out_channels: int, norm=LayerNormNd,
                 activation=nn.GELU):
        super().__init__()
        factors = [sorted(_prime_factors(int(p)), reverse=True) for p in patch_size]
        num_stages = max(1, max(len(f) for f in factors))
        strides = [[f[s] if s < len(f) else 1 for f in factors] for s in range(num_stages)]
        dim_red = (embed_dim / (2 * out_channels)) ** (1 / num_stages)
        channels = [embed_dim] + [int(max(8, np.round(embed_dim / dim_red ** (x + 1) / 8) * 8)) for x in range(num_stages)]
        channels[-1] = out_channels
        stages = []
        for s in range(num_stages):
            conv = nn.ConvTranspose3d(channels[s], channels[s + 1], kernel_size=strides[s], stride=strides[s])
            stages.append(conv if s == num_stages - 1 else nn.Sequential(conv, norm(channels[s + 1]), activation()))
        self.decode = nn.Sequential(*stages)

    def forward(self, x):
        return self.decode(x)
