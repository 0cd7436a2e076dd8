"""Planner base shared by the ViT-MAE methods (Hi-End-MAE, MAESIL): the plans' `architecture` is the *downstream*
Primus (`network_class_name` = dynamic_network_architectures' Primus, `arch_kwargs` incl. input_shape = patch
size); the MAE-only settings (mask ratio, decoder, ...) live in plans["nnssl"]["settings"]["method"].

CT windowing is written as data that nnU-Net's stock CTNormalization reproduces: clip to
[percentile_00_5, percentile_99_5] = [lo, hi], then (x − mean) / std with mean = lo, std = hi − lo.
So the plans stay stock-compatible (stock `nnUNetv2_preprocess` on a target gives the same intensities).

`downstream_num_classes` (settings, default 2): output channels of the untrained Primus `up_projection` kept in
the checkpoint so stock `-pretrained_weights` finds every key; set it to the target's number of segmentation
heads (background included), e.g. `arch_overrides={"downstream_num_classes": 3}`.
"""
from __future__ import annotations

from copy import deepcopy
from typing import Optional, Sequence, Tuple

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.planners.base import nnsslPlanner
from nnssl_plugins.planners.preprocessing import channel_names
from nnssl_plugins.pretrain.mae_common.config import PRIMUS_CLASS_NAME, validate_arch_kwargs


def mae_preset(config: dict, patch_size, batch_size: int, **extra) -> dict:
    """Planner preset (settings) of a method config {arch_kwargs, method}: the architecture without input_shape
    (the planner sets it to the patch size), the method part, patch and batch size."""
    arch = {k: v for k, v in deepcopy(config["arch_kwargs"]).items() if k != "input_shape"}
    return dict(patch_size=list(patch_size), batch_size=batch_size, arch=arch, method=deepcopy(config["method"]),
                downstream_num_classes=2, **extra)


class PrimusMAEPlanner(nnsslPlanner):
    """Shared by Hi-End-MAE and MAESIL: Primus architecture + CT window as CTNormalization data."""

    #: (lo, hi) HU window for channels named CT (→ [0, 1]); None = nnU-Net's default CT normalization
    ct_window: Optional[Tuple[float, float]] = None

    def architecture(self, patch_size: Sequence[int], num_input_channels: int) -> dict:
        kw = deepcopy(self.settings["arch"])
        kw["input_shape"] = [int(i) for i in patch_size]
        kw["patch_embed_size"] = [int(i) for i in kw["patch_embed_size"]]
        return {"network_class_name": PRIMUS_CLASS_NAME, "arch_kwargs": kw, "_kw_requires_import": []}

    def check_patch_size(self, patch_size: Sequence[int], arch: dict) -> None:
        try:
            validate_arch_kwargs(arch["arch_kwargs"])
        except UserInputError as e:
            raise UserInputError(f"--patch_size {list(patch_size)} ({self.method}, preset {self.preset}): {e}") from None
        n = self.settings.get("downstream_num_classes")
        if n is not None and int(n) < 1:
            raise UserInputError(f"downstream_num_classes={n}: must be >= 1 (background included).")

    def intensity_properties(self) -> dict:
        props = deepcopy(self.dataset_fingerprint["foreground_intensity_properties_per_channel"])
        if self.ct_window is None:
            return props
        lo, hi = (float(v) for v in self.ct_window)
        for c, name in channel_names(self.dataset_json).items():
            if str(name).lower() == "ct":
                props[str(c)].update(mean=lo, std=hi - lo, percentile_00_5=lo, percentile_99_5=hi)
        return props

    def plan_experiment(self) -> dict:
        plans = super().plan_experiment()
        if self.ct_window is not None:
            plans["nnssl"]["ct_window_to_unit_range"] = [float(v) for v in self.ct_window]
            self.save_plans(plans)
        return plans
