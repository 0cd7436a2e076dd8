"""Primus finetuning with a non-power-of-two token size (Hi-End-MAE's official 12³): the finetune trainer's
network decodes to the full patch size and loads a pretraining checkpoint's encoder."""
from __future__ import annotations

from copy import deepcopy

import torch

from nnssl_plugins.pretrain.common.primus_decoder import FactorizedPatchDecode


def _plans(patch_embed, patch):
    from nnssl_plugins.pretrain.hiend_mae.config import HIEND_TINY_CONFIG
    from nnssl_plugins.pretrain.mae_common.config import PRIMUS_CLASS_NAME

    kw = deepcopy(HIEND_TINY_CONFIG["arch_kwargs"])
    kw.update(patch_embed_size=list(patch_embed), input_shape=list(patch), eva_depth=2)
    cfg = {"data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 1, "patch_size": patch,
           "spacing": [1.5] * 3, "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
           "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
           "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
           "resampling_fn_probabilities": "resample_data_or_seg_to_shape", "resampling_fn_probabilities_kwargs": {},
           "architecture": {"network_class_name": PRIMUS_CLASS_NAME, "arch_kwargs": kw, "_kw_requires_import": []}}
    return {"dataset_name": "Dataset999_X", "plans_name": "p", "configurations": {"3d_fullres": cfg},
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "image_reader_writer": "SimpleITKIO",
            "original_median_spacing_after_transp": [1, 1, 1], "original_median_shape_after_transp": [1, 1, 1],
            "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {}}


def test_factorized_decoder_output_size():
    dec = FactorizedPatchDecode([12, 12, 6], 96, 3)
    assert dec(torch.randn(1, 96, 2, 2, 3)).shape == (1, 3, 24, 24, 18)


def test_finetune_primus_with_12_cubed_tokens_decodes_full_size_and_loads_encoder():
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnssl_plugins.pretrain.common.weight_transfer import backbone_keys, transfer_weights
    from nnssl_plugins.pretrain.common.networks import build_primus_from_plans

    pm = PlansManager(_plans([12, 12, 12], [48, 48, 48]))
    cm = pm.get_configuration("3d_fullres")
    torch.manual_seed(0)
    # what pretraining carries: a stock Primus (its PatchDecode cannot decode 12³ tokens to full size)
    src = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs, [], 1, 2, allow_init=True)
    net = build_primus_from_plans(pm, cm, 1, 3)
    x = torch.randn(1, 1, 48, 48, 48)
    with torch.no_grad():
        assert net(x).shape == (1, 3, 48, 48, 48)
    transfer_weights(net, src.state_dict(), mode="encoder", backbone=backbone_keys("Primus"), plan=None,
                     target_token_grid=None, source="test")
    sd = net.state_dict()
    for k, v in src.state_dict().items():
        if k.startswith(("eva.", "down_projection.")):
            assert torch.equal(sd[k], v), k
    # power-of-two tokens keep the stock decoder (same keys as stock Primus trainers)
    pm8 = PlansManager(_plans([8, 8, 8], [32, 32, 32]))
    net8 = build_primus_from_plans(pm8, pm8.get_configuration("3d_fullres"), 1, 3)
    assert type(net8.up_projection).__name__ == "PatchDecode"
