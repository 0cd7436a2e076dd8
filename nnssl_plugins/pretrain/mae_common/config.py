"""Config dicts shared by the MAE-style methods (Hi-End-MAE, MAESIL).

A method config is a plain, JSON-serialisable dict with two parts::

    {"arch_kwargs": {...},   # exactly the kwargs of dynamic_network_architectures' `Primus`
                             # (minus input_channels / num_classes) -> usable verbatim as a plans
                             # `architecture.arch_kwargs` with network_class_name = PRIMUS_CLASS_NAME
     "method": {...}}        # MAE-only settings (mask ratio, decoder width, ...)

`arch_kwargs["input_shape"]` is the network input (= nnU-Net patch size); set it with
`with_input_shape(config, patch_size)`.
"""
from __future__ import annotations

import copy
from typing import Sequence

from nnssl_plugins.errors import UserInputError

PRIMUS_CLASS_NAME = "dynamic_network_architectures.architectures.primus.Primus"

# Exactly what nnunetv2 2.8.1's nnUNet_Primus_B_Trainer builds (792-d, 12 layers, 12 heads, patch 8^3,
# scale_attn_inner=True, init_values=0.1). drop_path_rate is 0.2 downstream; it has no parameters, so
# pretraining may use any value without changing the state-dict keys.
PRIMUS_B_ARCH_KWARGS = dict(
    embed_dim=792,
    patch_embed_size=[8, 8, 8],
    eva_depth=12,
    eva_numheads=12,
    input_shape=None,
    drop_path_rate=0.0,
    scale_attn_inner=True,
    init_values=0.1,
)

# CPU-sized Primus (same structure/keys as Primus-B, just small). rope needs
# (embed_dim / heads) / 1.5 divisible by 4 -> head dim 24 works.
TINY_ARCH_KWARGS = dict(
    embed_dim=96,
    patch_embed_size=[8, 8, 8],
    eva_depth=4,
    eva_numheads=4,
    input_shape=[32, 32, 32],
    drop_path_rate=0.0,
    scale_attn_inner=True,
    init_values=0.1,
)


def with_input_shape(config: dict, input_shape: Sequence[int]) -> dict:
    """Copy of `config` with arch_kwargs['input_shape'] set (validated)."""
    cfg = copy.deepcopy(config)
    cfg["arch_kwargs"]["input_shape"] = [int(i) for i in input_shape]
    validate_arch_kwargs(cfg["arch_kwargs"])
    return cfg


def validate_arch_kwargs(arch_kwargs: dict) -> None:
    """Raise UserInputError for 2D data / patch size not divisible by the patch-embed size."""
    shape = arch_kwargs.get("input_shape")
    pe = arch_kwargs.get("patch_embed_size")
    if shape is None:
        raise UserInputError(
            "arch_kwargs['input_shape']: not set. Set it to the 3D patch size, e.g. "
            "with_input_shape(config, (96, 96, 96))."
        )
    if len(shape) != 3 or len(pe) != 3:
        raise UserInputError(
            f"arch_kwargs input_shape={list(shape)} / patch_embed_size={list(pe)}: MAE pretraining "
            "(Hi-End-MAE, MAESIL) supports 3D data only. Use a 3d_fullres configuration with a 3D patch size."
        )
    bad = [(s, p) for s, p in zip(shape, pe) if int(s) % int(p) != 0]
    if bad:
        raise UserInputError(
            f"patch size {list(shape)} is not divisible by the patch-embed size {list(pe)}. "
            f"Choose a patch size whose every axis is a multiple of the patch-embed size "
            f"(e.g. {[max(int(p), int(s) // int(p) * int(p)) for s, p in zip(shape, pe)]})."
        )
    dim, heads = int(arch_kwargs["embed_dim"]), int(arch_kwargs["eva_numheads"])
    if dim % heads != 0:
        raise UserInputError(f"arch_kwargs: embed_dim {dim} is not divisible by eva_numheads {heads}.")
    if arch_kwargs.get("use_rot_pos_emb", True):
        hd = dim / heads
        if hd % 1.5 != 0 or round(hd / 1.5) % 4 != 0:
            raise UserInputError(
                f"arch_kwargs: embed_dim/eva_numheads = {hd} but rotary embedding needs it to be a multiple of 6 "
                "(head_dim / 1.5 divisible by 4). Change embed_dim or eva_numheads, or set use_rot_pos_emb=False."
            )


def primus_arch_kwargs(config: dict) -> dict:
    """The downstream plans' arch_kwargs (for `Primus`) of a method config."""
    return copy.deepcopy(config["arch_kwargs"])


def method_config_from_plans(plans: dict, configuration: str = "3d_fullres") -> dict:
    """{arch_kwargs, method} config of pretrain/hiend_mae|maesil from a plans dict (architecture + nnssl settings);
    the model gets `up_projection_classes` = settings['downstream_num_classes']."""
    cfg = plans["configurations"][configuration]
    arch = copy.deepcopy(cfg["architecture"]["arch_kwargs"])
    arch["input_shape"] = [int(i) for i in cfg["patch_size"]]
    settings = (plans.get("nnssl") or {}).get("settings") or {}
    method = copy.deepcopy(settings.get("method") or {})
    n = settings.get("downstream_num_classes", 2)
    method["up_projection_classes"] = None if n is None else int(n)
    return {"arch_kwargs": arch, "method": method}
