"""Unlabeled data access on top of nnU-Net's own dataset class and dataloader."""
from __future__ import annotations

from typing import Tuple

from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2


class nnsslDatasetBlosc2(nnUNetDatasetBlosc2):
    """nnU-Net's blosc2 dataset; unlabeled cases have no `class_locations`, which nnUNetDataLoader
    reads even when it draws purely random crops (oversample 0). Give them an empty dict."""

    def load_case(self, identifier):
        data, seg, seg_prev, properties = super().load_case(identifier)
        properties.setdefault("class_locations", {})
        return data, seg, seg_prev, properties


def pretraining_transforms(patch_size: Tuple[int, ...], mirror_axes=(0, 1, 2), p_scaling: float = 0.2,
                           scaling=(0.85, 1.15)):
    """Light, image-only-meaningful augmentation for reconstruction pretraining (batchgeneratorsv2):
    random crop to the patch with mild isotropic scaling, then mirroring. Intensity augmentation is
    left out on purpose: reconstruction targets are the (unaugmented) intensities."""
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

    return ComposeTransforms([
        SpatialTransform(list(patch_size), patch_center_dist_from_border=0, random_crop=True, p_elastic_deform=0,
                         p_rotation=0, p_scaling=p_scaling, scaling=scaling, p_synchronize_scaling_across_axes=1,
                         bg_style_seg_sampling=False, border_mode_seg="constant", padding_value_seg=-1),
        MirrorTransform(allowed_axes=tuple(mirror_axes)),
    ])


def intensity_transforms():
    """nnU-Net's default intensity augmentation (image only)."""
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    return [
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
                        apply_probability=0.1),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=0.5, benchmark=False),
                        apply_probability=0.2),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1), apply_probability=0.15),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=1, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.1),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.3),
    ]
