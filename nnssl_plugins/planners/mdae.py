"""MDAE planner: 1 mm isotropic, ResEnc-L U-Net 32-64-128-256-320-320, 160³ patch (authors' nnssl setup).

Normalization is nnU-Net's default per channel name (CT → CTNormalization, else z-score), which is
what the authors' nnssl pipeline used; corruption happens on the normalized volume.
"""
from nnssl_plugins.planners.base import nnsslPlanner
from nnssl_plugins.pretrain.common.networks import resenc_architecture


class MDAEPlanner(nnsslPlanner):
    method = "MDAE"
    target_spacing = (1.0, 1.0, 1.0)
    presets = {
        "default": dict(patch_size=[160, 160, 160], batch_size=2,
                        features_per_stage=[32, 64, 128, 256, 320, 320], n_blocks_per_stage=[1, 3, 4, 6, 6, 6]),
        # CPU smoke runs: 32³ patch, 3 stages, 8 base features
        "tiny": dict(patch_size=[32, 32, 32], batch_size=2,
                     features_per_stage=[8, 16, 32], n_blocks_per_stage=[1, 1, 1]),
    }

    def architecture(self, patch_size, num_input_channels):
        s = self.settings
        return resenc_architecture(s["features_per_stage"], s["n_blocks_per_stage"], s.get("n_conv_per_stage_decoder"))
