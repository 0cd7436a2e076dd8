"""Case classification trainers (docs/finetuning.md).

    nnUNetv2_train D 3d_fullres F -p <transferred plans> -tr nnsslClsTrainer_Frozen -pretrained_weights ckpt.pth

Labels: `$nnUNet_raw/DatasetXXX/classification_labels.json`. Images come from nnU-Net's preprocessed data
(whole case centre-cropped/padded to the patch, nnU-Net's intensity/spatial augmentation without label
transforms). Validation writes `fold_X/validation_classification.json` and
`fold_X/validation_classification_probabilities.csv`.
"""
from __future__ import annotations

import os
from typing import List

import numpy as np
import torch
from torch import nn

from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgeneratorsv2.helpers.scalar_type import RandomScalar
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnssl_plugins.pretrain.common.classification import (
    EncoderClassifier,
    balanced_class_weights,
    build_classifier,
    center_crop_or_pad,
    classification_metrics,
    labels_file_for,
    load_classification_labels,
    write_probabilities_csv,
)
from nnssl_plugins.pretrain.common.data import intensity_transforms
from nnssl_plugins.pretrain.common.networks import unwrap_network
from nnssl_plugins.pretrain.common.weight_transfer import WarmupPolyLR, backbone_keys, encoder_prefixes
from nnssl_plugins.trainers.finetune import nnsslPretrainedMixin
from nnssl_plugins.trainers.smoke import nnsslSmokeRun
from nnssl_plugins.utils.io import atomic_write_json


VALIDATION_JSON = "validation_classification.json"
VALIDATION_CSV = "validation_classification_probabilities.csv"
CLASSES_JSON = "classification_classes.json"


class ClsDataLoader(nnUNetDataLoader):
    """Whole case -> centre crop/pad to `patch_size` -> image-only transforms; target = class index."""

    def __init__(self, *args, case_labels: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.case_labels = case_labels

    def generate_train_batch(self):
        keys = self.get_indices()
        images, targets = [], []
        for k in keys:
            data, _, _, _ = self._data.load_case(k)
            img = torch.from_numpy(center_crop_or_pad(data, self.patch_size))
            if self.transforms is not None:
                img = self.transforms(image=img)["image"]
            images.append(img)
            targets.append(self.case_labels[k])
        return {"data": torch.stack(images).float(), "target": torch.tensor(targets, dtype=torch.long), "keys": keys}


def classification_transforms(patch_size, rotation_for_DA: RandomScalar, mirror_axes) -> BasicTransform:
    """nnU-Net's training augmentation minus everything that touches labels."""
    t = [SpatialTransform(patch_size, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
                          p_rotation=0.2, rotation=rotation_for_DA, p_scaling=0.2, scaling=(0.7, 1.4),
                          p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False),
         *intensity_transforms()]  # nnU-Net's intensity augmentation (image only), shared with MASS
    if mirror_axes:
        t.append(MirrorTransform(allowed_axes=mirror_axes))
    return ComposeTransforms(t)


class nnsslClsTrainer(nnsslPretrainedMixin, nnUNetTrainer):
    """Full finetuning classifier: AdamW, head lr `initial_lr`, encoder lr `initial_lr * encoder_lr_factor`."""

    freeze_encoder = False
    pretrained_mode = "encoder"
    class_weighting = None          # None or 'balanced' (inverse class frequency of the training split)
    encoder_lr_factor = 0.1

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # read the labels file first: a bad one fails before nnU-Net creates the output folder and log file
        labels_file = labels_file_for(plans["dataset_name"])
        case_labels, class_names = load_classification_labels(labels_file)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.labels_file, self.case_labels, self.class_names = labels_file, case_labels, class_names
        self.num_classes = len(self.class_names)
        self.enable_deep_supervision = False
        self.initial_lr = 1e-3
        self.weight_decay = 1e-2
        self.num_epochs = 100

    # ---- network ------------------------------------------------------------------------------------------
    def build_network_architecture(self, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision=True) -> nn.Module:
        return build_classifier(plans_manager, configuration_manager, num_input_channels, self.num_classes)

    def set_deep_supervision_enabled(self, enabled: bool):
        pass

    def _get_deep_supervision_scales(self):
        return None

    def _classifier(self) -> EncoderClassifier:
        return unwrap_network(self.network)

    def backbone_arch_name(self) -> str:
        return self._classifier().arch_name

    def backbone_spec(self) -> dict:
        return backbone_keys(self._classifier().arch_name)

    def target_token_grid(self):
        patch = self.configuration_manager.network_arch_init_kwargs.get("patch_embed_size")
        if self._classifier().kind != "primus" or patch is None:
            return None
        return tuple(int(s) // int(p) for s, p in zip(self.configuration_manager.patch_size, patch))

    def _build_loss(self):
        weight = None
        if self.class_weighting == "balanced":
            tr_keys, _ = self.do_split()
            weight = balanced_class_weights([self.case_labels[k] for k in tr_keys if k in self.case_labels],
                                            self.num_classes).to(self.device)
            self.print_to_log_file(f"class weights: {weight.tolist()}")
        return nn.CrossEntropyLoss(weight=weight)

    def configure_optimizers(self):
        trainable = set(id(p) for p in self.trainable_parameters())
        mod = self._classifier()
        enc = encoder_prefixes(self.backbone_spec())
        enc_params, head_params = [], []
        for name, p in mod.named_parameters():
            if id(p) not in trainable:
                continue
            (enc_params if any(name.startswith(e + ".") or name == e for e in enc) else head_params).append(p)
        groups = [{"params": head_params, "lr": self.initial_lr}]
        if enc_params:
            groups.append({"params": enc_params, "lr": self.initial_lr * self.encoder_lr_factor})
        optimizer = torch.optim.AdamW(groups, self.initial_lr, weight_decay=self.weight_decay)
        scheduler = WarmupPolyLR(optimizer, self.num_epochs, self.warmup_epochs())
        self.print_to_log_file(f"AdamW head lr {self.initial_lr}, encoder lr "
                               f"{self.initial_lr * self.encoder_lr_factor if enc_params else 'frozen'}, warm-up "
                               f"{self.warmup_epochs()} epochs then poly")
        return optimizer, scheduler

    # ---- data ---------------------------------------------------------------------------------------------
    def _check_labels(self, keys: List[str]):
        load_classification_labels(self.labels_file, required_cases=keys)

    def get_dataloaders(self):
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch_size = self.configuration_manager.patch_size
        rotation_for_DA, _, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        self._check_labels(list(dataset_tr.identifiers) + list(dataset_val.identifiers))
        tr_transforms = classification_transforms(patch_size, rotation_for_DA, mirror_axes)
        dl_tr = ClsDataLoader(dataset_tr, self.batch_size, initial_patch_size, patch_size, self.label_manager,
                              transforms=tr_transforms, case_labels=self.case_labels)
        dl_val = ClsDataLoader(dataset_val, self.batch_size, patch_size, patch_size, self.label_manager,
                               transforms=None, case_labels=self.case_labels)
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            gen_tr, gen_val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        else:
            gen_tr = NonDetMultiThreadedAugmenter(dl_tr, None, n_proc, max(6, n_proc // 2), None,
                                                  pin_memory=self.device.type == "cuda", wait_time=0.002)
            gen_val = NonDetMultiThreadedAugmenter(dl_val, None, max(1, n_proc // 2), max(3, n_proc // 4), None,
                                                   pin_memory=self.device.type == "cuda", wait_time=0.002)
        _ = next(gen_tr)
        _ = next(gen_val)
        return gen_tr, gen_val

    def on_train_start(self):
        super().on_train_start()
        atomic_write_json({"class_names": self.class_names, "num_classes": self.num_classes,
                           "labels_file": self.labels_file},
                          os.path.join(self.output_folder, CLASSES_JSON))

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._encoder_modules_eval()

    # ---- steps --------------------------------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else _null():
            loss = self.loss(self.network(data), target)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else _null():
            logits = self.network(data)
            loss = self.loss(logits, target)
        correct = (logits.argmax(1) == target).float().mean()
        return {"loss": loss.detach().cpu().numpy(), "acc": correct.detach().cpu().numpy()}

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        loss = float(np.mean([o["loss"] for o in val_outputs]))
        acc = float(np.mean([o["acc"] for o in val_outputs]))
        # nnU-Net's logger tracks 'mean_fg_dice' (and its EMA for checkpoint_best): we log accuracy there
        self.logger.log("mean_fg_dice", acc, self.current_epoch)
        self.logger.log("dice_per_class_or_region", [acc], self.current_epoch)
        self.logger.log("val_losses", loss, self.current_epoch)
        self.print_to_log_file(f"val accuracy (batches): {np.round(acc, 4)}")

    # ---- final validation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_case_probabilities(self, data: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(center_crop_or_pad(data, self.configuration_manager.patch_size))[None].to(self.device)
        return torch.softmax(self.network(x).float(), 1)[0].cpu().numpy()

    def perform_actual_validation(self, save_probabilities: bool = False):
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        self.network.eval()
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        _, val_keys = self.do_split()
        self._check_labels(val_keys)
        dataset_val = self.dataset_class(self.preprocessed_dataset_folder, val_keys)
        probs = []
        for k in val_keys:
            data, _, _, _ = dataset_val.load_case(k)
            probs.append(self.predict_case_probabilities(np.asarray(data)))
        probs = np.stack(probs) if probs else np.zeros((0, self.num_classes))
        y = [self.case_labels[k] for k in val_keys]
        metrics = classification_metrics(y, probs, self.class_names)
        metrics["fold"] = self.fold
        metrics["trainer"] = self.__class__.__name__
        atomic_write_json(metrics, os.path.join(self.output_folder, VALIDATION_JSON))
        write_probabilities_csv(os.path.join(self.output_folder, VALIDATION_CSV), val_keys, probs,
                                self.class_names, y)
        self.print_to_log_file(f"classification validation: AUROC {metrics['auroc']}, accuracy "
                               f"{metrics['accuracy']:.4f}, balanced accuracy {metrics['balanced_accuracy']:.4f}")
        return metrics


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


class nnsslClsTrainer_Frozen(nnsslClsTrainer):
    """MASS protocol: frozen pretrained encoder, attention pooling + linear head trained."""

    freeze_encoder = True


class nnsslClsTrainer_balanced(nnsslClsTrainer):
    class_weighting = "balanced"


class nnsslClsTrainer_Frozen_balanced(nnsslClsTrainer_Frozen):
    class_weighting = "balanced"


class nnsslClsTrainer_Frozen_smoke(nnsslSmokeRun, nnsslClsTrainer_Frozen):
    """The demo's classification run."""
