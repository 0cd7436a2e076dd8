"""MAESIL pretraining trainer (thin wiring of pretrain/maesil; shared MAE wiring in trainers/mae_base.py).

S–I axis per case: nnU-Net's batch holds only `data`, `target` and `keys`, so the trainer looks each key's
properties up once (`<preprocessed folder>/<key>.pkl`, written by nnU-Net's preprocessor; with
SimpleITK-read data it contains `sitk_stuff['direction']`) and caches
`find_si_axis(direction, plans['transpose_forward'])`. Our augmentation (random crop, isotropic scaling,
mirroring — no rotation/transposition) keeps array axes, so the axis stays valid for the patch. Cases without
a direction (e.g. NIfTI read by NibabelIO) use method['si_axis'] (a warning is logged once). If a batch mixes
S–I axes on a non-cubic token grid (unequal visible counts), the batch's most common axis is used.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional

from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_pickle

from nnssl_plugins.pretrain.maesil.masking import find_si_axis
from nnssl_plugins.pretrain.maesil.model import build_model, compute_loss
from nnssl_plugins.trainers.mae_base import MAEPretrainTrainerBase, freeze_up_projection, mae_config_from_managers
from nnssl_plugins.trainers.smoke import nnsslSmokeRun


class MAESILPretrainTrainer(MAEPretrainTrainerBase):
    method = "MAESIL"

    # per-case S-I axis cache (class-level defaults, instance dicts created on first use; nnU-Net records the
    # explicit __init__ signature, so the trainer keeps the base one)
    _si_axis_cache: Optional[Dict[str, Optional[int]]] = None
    _warned_no_direction: bool = False

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = False):
        return freeze_up_projection(build_model(mae_config_from_managers(plans_manager, configuration_manager),
                                                num_input_channels))

    def si_axis_of_case(self, key: str) -> Optional[int]:
        if self._si_axis_cache is None:
            self._si_axis_cache = {}
        if key not in self._si_axis_cache:
            axis = None
            fn = join(self.preprocessed_dataset_folder, key + ".pkl")
            if isfile(fn):
                direction = (load_pickle(fn).get("sitk_stuff") or {}).get("direction")
                if direction is not None and len(direction) == 9:
                    axis = find_si_axis(direction, self.plans_manager.transpose_forward)
            if axis is None and not self._warned_no_direction:
                self._warned_no_direction = True
                self.print_to_log_file(f"MAESIL: no image direction for case {key} (not read by SimpleITK?); "
                                       f"using method['si_axis'] as its S-I axis.")
            self._si_axis_cache[key] = axis
        return self._si_axis_cache[key]

    def batch_si_axes(self, model, batch: dict):
        default = model.default_si_axis
        keys = batch.get("keys")
        if keys is None or len(keys) != batch["data"].shape[0]:
            return default
        axes: List[int] = [a if a is not None else default for a in (self.si_axis_of_case(str(k)) for k in keys)]
        if len(set(axes)) == 1:
            return axes[0]
        if len(set(model.grid_size)) != 1:  # unequal visible-token counts otherwise
            return Counter(axes).most_common(1)[0][0]
        return axes

    def _method_loss(self, model, batch, return_pictures):
        return compute_loss(model, batch["data"], si_axis=self.batch_si_axes(model, batch),
                            return_pictures=return_pictures)


class MAESILPretrainTrainer_smoke(nnsslSmokeRun, MAESILPretrainTrainer):
    pass
