"""Backbones from plans, and the one place that unwraps trained networks.

* `resenc_architecture`     a ResidualEncoderUNet `architecture` entry in nnU-Net's plans format (CNN methods)
* `build_primus_from_plans` dynamic-network-architectures' Primus from a plans configuration (ViT methods,
                            finetuning, classification)
* `unwrap_network`          DDP → `.module`, torch.compile → `._orig_mod` (by type, so it is also right before
                            nnU-Net wraps the network in DDP)
* `strip_wrapper_prefixes`  the matching key clean-up for state dicts saved from wrapped networks
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

from torch import nn
from torch._dynamo.eval_frame import OptimizedModule
from torch.nn.parallel import DataParallel, DistributedDataParallel

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.common.primus_decoder import FactorizedPatchDecode, is_power_of_two

RESENC_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def resenc_architecture(features_per_stage: Sequence[int], n_blocks_per_stage: Sequence[int],
                        n_conv_per_stage_decoder: Optional[Sequence[int]] = None) -> dict:
    """ResidualEncoderUNet arch entry in nnU-Net's plans format (isotropic 3x3x3 kernels, stride-2 pools)."""
    n = len(features_per_stage)
    if len(n_blocks_per_stage) != n:
        raise ValueError("n_blocks_per_stage must have one entry per stage")
    return {
        "network_class_name": RESENC_CLASS,
        "arch_kwargs": {
            "n_stages": n,
            "features_per_stage": [int(f) for f in features_per_stage],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * n,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
            "n_blocks_per_stage": [int(b) for b in n_blocks_per_stage],
            "n_conv_per_stage_decoder": [int(b) for b in (n_conv_per_stage_decoder or [1] * (n - 1))],
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def build_primus_from_plans(plans_manager, configuration_manager, num_input_channels: int,
                            num_output_channels: int) -> nn.Module:
    """Primus from the plans' architecture entry, with input_shape = the configuration's patch size."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    name = configuration_manager.network_arch_class_name
    if "primus" not in name.lower():
        raise UserInputError(
            f"plans '{plans_manager.plans_name}': configuration architecture is '{name}', but the Primus trainers "
            f"need a Primus architecture. Use plans written by nnssl_transfer_plans from a Primus checkpoint "
            f"(Hi-End-MAE, MAESIL), or nnsslFinetuneTrainer for CNN plans."
        )
    kwargs = dict(configuration_manager.network_arch_init_kwargs)
    kwargs["input_shape"] = [int(i) for i in configuration_manager.patch_size]
    patch = kwargs.get("patch_embed_size")
    if patch is not None and any(s % p for s, p in zip(kwargs["input_shape"], patch)):
        raise UserInputError(
            f"plans '{plans_manager.plans_name}': patch size {kwargs['input_shape']} is not divisible by the Primus "
            f"token size {list(patch)}. Set a patch size that is a multiple of it in the plans."
        )
    net = get_network_from_plans(name, kwargs, configuration_manager.network_arch_init_kwargs_req_import,
                                 num_input_channels, num_output_channels, allow_init=True, deep_supervision=None)
    if patch is not None and not all(is_power_of_two(int(p)) for p in patch):
        # stock PatchDecode only upsamples by powers of two (12³ tokens would decode to the wrong size)
        net.up_projection = FactorizedPatchDecode(patch, net.embed_dim, num_output_channels)
    return net


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel / torch.compile wrappers (in any nesting). Decided by type,
    not by the trainer's `is_ddp` flag: nnU-Net calls `configure_optimizers` after compiling and *before*
    wrapping in DDP, so a distributed trainer's network is not always wrapped yet."""
    mod = network
    while True:
        if isinstance(mod, (DistributedDataParallel, DataParallel)):
            mod = mod.module
        elif isinstance(mod, OptimizedModule):
            mod = mod._orig_mod
        else:
            return mod


def strip_wrapper_prefixes(state_dict: Dict[str, object]) -> Dict[str, object]:
    """Keys of a state dict saved from a wrapped network as the plain module names them: a leading `module.`
    (DDP) and every `_orig_mod.` (torch.compile) removed."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("module."):
            k = k[len("module."):]
        out[k.replace("_orig_mod.", "")] = v
    return out
