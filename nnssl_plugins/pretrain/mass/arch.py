"""Backbone architecture for MASS: dynamic-network-architectures' ResidualEncoderUNet.

`arch_kwargs` use nnU-Net's plans format (`plans['configurations'][c]['architecture']['arch_kwargs']`):
the entries named in `_kw_requires_import` (conv_op, norm_op, dropout_op, nonlin) may be dotted
strings ("torch.nn.modules.conv.Conv3d") or the classes themselves.
"""
from __future__ import annotations

import pydoc
from copy import deepcopy
from typing import Sequence

import numpy as np

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.common.networks import RESENC_CLASS, resenc_architecture

NETWORK_CLASS_NAME = RESENC_CLASS
KW_REQUIRES_IMPORT = ("conv_op", "norm_op", "dropout_op", "nonlin")


def mass_arch_kwargs(
    n_stages: int = 5,
    base_features: int = 32,
    max_features: int = 512,
    n_blocks_per_stage: int | Sequence[int] = 2,
    n_conv_per_stage_decoder: int | Sequence[int] = 1,
) -> dict:
    """Plans-format `arch_kwargs` for the MASS backbone (isotropic 3D, kernel 3, strides 1,2,2,...).

    Default = official MASS: 4 downsamplings, 32-64-128-256-512, 2 residual blocks per stage,
    1 conv per decoder stage. Tiny test config e.g. `mass_arch_kwargs(4, 8, 64)`.
    """
    if isinstance(n_blocks_per_stage, int):
        n_blocks_per_stage = [n_blocks_per_stage] * n_stages
    if isinstance(n_conv_per_stage_decoder, int):
        n_conv_per_stage_decoder = [n_conv_per_stage_decoder] * (n_stages - 1)
    features = [min(base_features * 2 ** i, max_features) for i in range(n_stages)]
    return resenc_architecture(features, n_blocks_per_stage, n_conv_per_stage_decoder)["arch_kwargs"]


def mass_architecture_plans(arch_kwargs: dict | None = None) -> dict:
    """The plans `architecture` entry (network_class_name + arch_kwargs + _kw_requires_import)."""
    return {
        "network_class_name": NETWORK_CLASS_NAME,
        "arch_kwargs": deepcopy(arch_kwargs if arch_kwargs is not None else mass_arch_kwargs()),
        "_kw_requires_import": list(KW_REQUIRES_IMPORT),
    }


def resolve_arch_kwargs(arch_kwargs: dict, kw_requires_import: Sequence[str] = KW_REQUIRES_IMPORT) -> dict:
    """Import the string entries (like nnU-Net's get_network_from_plans) and drop plan-only keys."""
    kw = deepcopy(dict(arch_kwargs))
    kw.pop("_kw_requires_import", None)
    for k in kw_requires_import:
        v = kw.get(k)
        if isinstance(v, str):
            obj = pydoc.locate(v)
            if obj is None:
                raise UserInputError(f"arch_kwargs['{k}']: cannot import '{v}'. Use a dotted path such as "
                                     f"'torch.nn.modules.conv.Conv3d'.")
            kw[k] = obj
    return kw


def build_backbone(arch_kwargs: dict, input_channels: int, num_classes: int = 1, deep_supervision: bool = False):
    """A stock ResidualEncoderUNet from plans-format arch_kwargs."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    kw = resolve_arch_kwargs(arch_kwargs)
    try:
        return ResidualEncoderUNet(input_channels, num_classes=num_classes, deep_supervision=deep_supervision, **kw)
    except (TypeError, AssertionError) as e:
        raise UserInputError(f"arch_kwargs: cannot build ResidualEncoderUNet ({e}). Check n_stages, "
                             f"features_per_stage, strides and n_blocks_per_stage lengths.") from None


def cumulative_strides(arch_kwargs: dict) -> list[tuple[int, int, int]]:
    """Per-stage cumulative stride (per axis) of the encoder outputs."""
    n = arch_kwargs["n_stages"]
    strides = arch_kwargs["strides"]
    if isinstance(strides, int):
        strides = [strides] * n
    out, cur = [], np.ones(3, dtype=int)
    for s in strides:
        s = np.array([s] * 3 if isinstance(s, int) else list(s), dtype=int)
        cur = cur * s
        out.append(tuple(int(i) for i in cur))
    return out
