"""Base planner: a method fixes spacing, patch size, normalization and architecture; plans stay data.

Output is a standard nnU-Net plans file `nnsslPlans_<METHOD>[_<preset>].json` with one configuration,
`3d_fullres`, whose `architecture` is `network_class_name` + `arch_kwargs` + `_kw_requires_import`
exactly like nnU-Net's own planners write it. We subclass nnU-Net's ExperimentPlanner to reuse its
resampling, normalization-scheme, transpose and reader/writer choices.
"""
from __future__ import annotations

from copy import deepcopy
from typing import Optional, Sequence

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

from nnssl_plugins.errors import UserInputError


class nnsslPlanner(ExperimentPlanner):
    """Subclass per method: set `method`, `target_spacing`, `presets`; override `architecture` and,
    if the method prescribes intensities, `intensity_properties`. A subclass with `method` set in a module of
    this package is registered by that name (planners/registry.py); its trainer is `<method>PretrainTrainer`."""

    method: str = None
    target_spacing: Sequence[float] = (1.0, 1.0, 1.0)
    #: preset name → dict(patch_size=[...], batch_size=int, features_per_stage=[...], n_blocks_per_stage=[...], ...)
    presets: dict = {}

    def __init__(self, dataset_name_or_id, preset: str = "default", plans_name: Optional[str] = None,
                 patch_size: Optional[Sequence[int]] = None, spacing: Optional[Sequence[float]] = None,
                 batch_size: Optional[int] = None, arch_overrides: Optional[dict] = None):
        if preset not in self.presets:
            raise UserInputError(f"--preset {preset}: unknown for {self.method}. Choose one of {sorted(self.presets)}.")
        self.preset = preset
        self.settings = deepcopy(self.presets[preset])
        if patch_size is not None:
            self.settings["patch_size"] = [int(i) for i in patch_size]
        if batch_size is not None:
            self.settings["batch_size"] = int(batch_size)
        self.settings.update(arch_overrides or {})
        spacing = [float(s) for s in (spacing or self.settings.get("spacing", self.target_spacing))]
        super().__init__(dataset_name_or_id, plans_name=plans_name or self.default_plans_name(preset),
                         overwrite_target_spacing=spacing, suppress_transpose=True)

    @classmethod
    def default_plans_name(cls, preset: str = "default") -> str:
        return f"nnsslPlans_{cls.method}" + ("" if preset == "default" else f"_{preset}")

    @classmethod
    def add_cli_arguments(cls, group) -> None:
        """The method's own options of `nnssl_pretrain` (an argparse argument group). Their values reach the
        trainer's `prepare_pretraining_data(dataset, plans, options)`. None by default."""

    # --- hooks a method overrides ---------------------------------------------------------------
    def architecture(self, patch_size: Sequence[int], num_input_channels: int) -> dict:
        raise NotImplementedError

    def intensity_properties(self) -> dict:
        """Per-channel stats that nnU-Net's normalization classes read. Default: the fingerprint's."""
        return deepcopy(self.dataset_fingerprint["foreground_intensity_properties_per_channel"])

    def check_patch_size(self, patch_size: Sequence[int], arch: dict) -> None:
        strides = arch["arch_kwargs"].get("strides")
        if strides is not None:
            div = np.prod(np.array(strides), axis=0)
            if any(p % d for p, d in zip(patch_size, div)):
                raise UserInputError(f"--patch_size {list(patch_size)}: must be divisible by {div.tolist()} "
                                     f"(the network downsamples by that much). Pick a multiple.")

    # --- planning ---------------------------------------------------------------------------------
    def plan_experiment(self) -> dict:
        spacing = np.array(self.overwrite_target_spacing, dtype=float)
        n_ch = len(self.dataset_json.get("channel_names", self.dataset_json.get("modality")))
        patch_size = [int(i) for i in self.settings["patch_size"]]
        arch = self.architecture(patch_size, n_ch)
        self.check_patch_size(patch_size, arch)
        new_shapes = [compute_new_shape(j, i, spacing) for i, j in
                      zip(self.dataset_fingerprint["spacings"], self.dataset_fingerprint["shapes_after_crop"])]
        median_shape = np.median(new_shapes, 0)
        r_data, r_data_kw, r_seg, r_seg_kw = self.determine_resampling()
        r_prob, r_prob_kw = self.determine_segmentation_softmax_export_fn()
        norm, mask_for_norm = self.determine_normalization_scheme_and_whether_mask_is_used_for_norm()
        config = {
            "data_identifier": self.generate_data_identifier("3d_fullres"),
            "preprocessor_name": self.preprocessor_name,
            "batch_size": int(self.settings.get("batch_size", 2)),
            "patch_size": patch_size,
            "median_image_size_in_voxels": [float(i) for i in median_shape],
            "spacing": [float(i) for i in spacing],
            "normalization_schemes": norm,
            "use_mask_for_norm": mask_for_norm,
            "resampling_fn_data": r_data.__name__,
            "resampling_fn_seg": r_seg.__name__,
            "resampling_fn_data_kwargs": r_data_kw,
            "resampling_fn_seg_kwargs": r_seg_kw,
            "resampling_fn_probabilities": r_prob.__name__,
            "resampling_fn_probabilities_kwargs": r_prob_kw,
            "architecture": arch,
            "batch_dice": False,
        }
        fp = self.dataset_fingerprint
        plans = {
            "dataset_name": self.dataset_name,
            "plans_name": self.plans_identifier,
            "original_median_spacing_after_transp": [float(i) for i in np.median(fp["spacings"], 0)],
            "original_median_shape_after_transp": [int(round(i)) for i in np.median(fp["shapes_after_crop"], 0)],
            "image_reader_writer": self.determine_reader_writer().__name__,
            "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2],
            "configurations": {"3d_fullres": config},
            "experiment_planner_used": self.__class__.__name__,
            "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": self.intensity_properties(),
            "nnssl": {"method": self.method, "preset": self.preset, "settings": deepcopy(self.settings)},
        }
        self.plans = plans
        self.save_plans(plans)
        return plans
