"""MASS planner: 1.5 mm isotropic, 128³ patch, ResEnc U-Net with 4 downsamplings (32-64-128-256-512,
2 residual blocks per stage = official MASS), batch 2.

Intensities (official MASS preprocessing):
  CT      clip [−991, 500] HU, then z-score with the mean/std of the *clipped* foreground intensities.
          Written as plans data for nnU-Net's stock CTNormalization (percentile_00_5 = −991,
          percentile_99_5 = 500, mean/std from the fingerprint's foreground histogram), so stock
          `nnUNetv2_preprocess` reproduces it on downstream targets.
  MR/PET  official: per-image 2–98th percentile clip + z-score. Not expressible with stock normalization
          classes (stock preprocessing only finds classes inside nnunetv2). Choice: the plans keep stock
          ZScoreNormalization (per image); the MASS sampler and in-context inference then clip each case's
          z-scored channel to its own [p2, p98] and re-standardise (`percentile_clip_zscore`, computed once
          per case). Clip-then-z-score of an affine-transformed image equals the official order, so the
          network sees the official intensities; downstream stock fine-tuning sees plain z-score (a mild
          mismatch, documented in docs/mass.md). The channels it applies to are listed in
          plans["nnssl"]["percentile_clip_channels"].

Presets
  default  128³, 5 stages 32..512 (encoder ≈ the paper's 37.66 M parameters, see docs/mass.md)
  tiny     32³, 4 stages 8-16-32-64, 1 block per stage (CPU smoke runs)
"""
from __future__ import annotations

from copy import deepcopy
from typing import Sequence

from nnssl_plugins.planners.base import nnsslPlanner
from nnssl_plugins.planners.preprocessing import channel_names

CT_CLIP = (-991.0, 500.0)
PERCENTILE_CLIP = (2.0, 98.0)


class MASSPlanner(nnsslPlanner):
    method = "MASS"
    target_spacing = (1.5, 1.5, 1.5)
    presets = {
        "default": dict(patch_size=[128, 128, 128], batch_size=2, n_stages=5, base_features=32, max_features=512,
                        n_blocks_per_stage=2),
        "tiny": dict(patch_size=[32, 32, 32], batch_size=2, n_stages=4, base_features=8, max_features=64,
                     n_blocks_per_stage=1),
    }

    @classmethod
    def add_cli_arguments(cls, group) -> None:
        group.add_argument("--mask-backend", default=None, choices=["slic", "sam2", "labels"],
                           help="mask backend for MASSPretrainTrainer.prepare_pretraining_data (default slic)")
        group.add_argument("--sam2-checkpoint", default=None, help="sam2 backend: checkpoint file")
        group.add_argument("--sam2-config", default=None, help="sam2 backend: config name inside the sam2 package")

    def architecture(self, patch_size: Sequence[int], num_input_channels: int) -> dict:
        from nnssl_plugins.pretrain.mass.arch import mass_arch_kwargs, mass_architecture_plans

        s = self.settings
        kw = mass_arch_kwargs(int(s["n_stages"]), int(s["base_features"]), int(s["max_features"]),
                              s.get("n_blocks_per_stage", 2), s.get("n_conv_per_stage_decoder", 1))
        return mass_architecture_plans(kw)

    def intensity_properties(self) -> dict:
        from nnssl_plugins.planners.preprocessing import clipped_intensity_stats

        props = deepcopy(self.dataset_fingerprint["foreground_intensity_properties_per_channel"])
        lo, hi = CT_CLIP
        for c, name in channel_names(self.dataset_json).items():
            if str(name).lower() != "ct":
                continue
            if "nnssl_intensity_histograms" in self.dataset_fingerprint:
                props[str(c)].update(clipped_intensity_stats(self.dataset_fingerprint, int(c), lo, hi))
            else:  # fingerprint from stock nnU-Net: no histogram → unclipped stats (approximation)
                props[str(c)].update(percentile_00_5=lo, percentile_99_5=hi)
        return props

    def plan_experiment(self) -> dict:
        plans = super().plan_experiment()
        names = channel_names(self.dataset_json)
        plans["nnssl"]["ct_clip"] = list(CT_CLIP)
        plans["nnssl"]["percentile_clip"] = list(PERCENTILE_CLIP)
        plans["nnssl"]["percentile_clip_channels"] = [int(c) for c, n in names.items() if str(n).lower() != "ct"]
        self.save_plans(plans)
        return plans
