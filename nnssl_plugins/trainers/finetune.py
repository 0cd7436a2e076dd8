"""Segmentation finetuning trainers for our pretraining checkpoints (docs/finetuning.md).

    nnUNetv2_train D 3d_fullres F -p <transferred plans> -tr nnsslFinetuneTrainer -pretrained_weights ckpt.pth

Stock `-pretrained_weights` is routed to `load_pretrained` of these trainers (see
`weight_transfer.register_pretrained_owner`): encoder(+stem)-only or full loading, input-channel
adaption and positional-embedding interpolation, with a report of every key in the training log.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.primus.primus_trainers import AbstractPrimus
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnssl_plugins.pretrain.common.networks import build_primus_from_plans, unwrap_network
from nnssl_plugins.pretrain.common.weight_transfer import (
    WarmupPolyLR,
    backbone_keys,
    encoder_prefixes,
    freeze_prefixes,
    load_pretrained_into,
    register_pretrained_owner,
    warmup_epochs_for,
)
from nnssl_plugins.trainers.smoke import nnsslSmokeRun


class nnsslPretrainedMixin:
    """Owns `-pretrained_weights` loading and encoder freezing. Mix in before an nnUNetTrainer class."""

    pretrained_mode: str = "encoder"   # 'encoder' (stem + encoder, decoder fresh) or 'full'
    freeze_encoder: bool = False
    warmup_reference_epochs: int = 50  # upstream: 50 of 1000 epochs, scaled to num_epochs

    # -- hooks -------------------------------------------------------------------------------------------
    def initialize(self):
        super().initialize()
        register_pretrained_owner(self.network, self)

    def backbone_spec(self) -> dict:
        return backbone_keys(type(unwrap_network(self.network)).__name__)

    def backbone_arch_name(self) -> str:
        return type(unwrap_network(self.network)).__name__

    def target_token_grid(self) -> Optional[Tuple[int, ...]]:
        return None

    def load_pretrained(self, fname: str):
        """Called for `-pretrained_weights` (through the dispatcher) or directly."""
        if not self.was_initialized:
            self.initialize()
        report = load_pretrained_into(self.network, fname, mode=self.pretrained_mode, backbone=self.backbone_spec(),
                                      expected_arch=self.backbone_arch_name(),
                                      target_token_grid=self.target_token_grid(), log=self.print_to_log_file)
        self.pretrained_weights_file = fname
        return report

    def warmup_epochs(self) -> int:
        return warmup_epochs_for(self.num_epochs, self.warmup_reference_epochs)

    def trainable_parameters(self) -> List[nn.Parameter]:
        if self.freeze_encoder:
            n = freeze_prefixes(self.network, encoder_prefixes(self.backbone_spec()))
            self.print_to_log_file(f"Frozen encoder: {n} parameter tensors under {encoder_prefixes(self.backbone_spec())}")
        return [p for p in self.network.parameters() if p.requires_grad]

    def _encoder_modules_eval(self):
        if self.freeze_encoder:
            mod = unwrap_network(self.network)
            for prefix in encoder_prefixes(self.backbone_spec()):
                mod.get_submodule(prefix).eval()


class nnsslFinetuneTrainer(nnsslPretrainedMixin, nnUNetTrainer):
    """ResEnc (or any CNN U-Net from the plans) finetuning: SGD lr 1e-3, nesterov 0.99, warm-up then poly."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.trainable_parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=0.99, nesterov=True)
        scheduler = WarmupPolyLR(optimizer, self.num_epochs, self.warmup_epochs())
        self.print_to_log_file(f"SGD lr {self.initial_lr}, linear warm-up {self.warmup_epochs()} epochs, then poly")
        return optimizer, scheduler

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._encoder_modules_eval()


class nnsslFinetuneTrainer_full(nnsslFinetuneTrainer):
    pretrained_mode = "full"


class nnsslFinetuneTrainer_frozenEncoder(nnsslFinetuneTrainer):
    freeze_encoder = True


class nnsslFinetuneTrainer_150ep(nnsslFinetuneTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 150


class nnsslPrimusFinetuneTrainer(nnsslPretrainedMixin, AbstractPrimus):
    """Primus finetuning (Hi-End-MAE / MAESIL checkpoints): AdamW lr 1e-4, warm-up then poly,
    positional embedding interpolated when the patch size differs from pretraining."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-4
        self.num_epochs = 1000

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return build_primus_from_plans(plans_manager, configuration_manager, num_input_channels, num_output_channels)

    def target_token_grid(self):
        patch = self.configuration_manager.network_arch_init_kwargs.get("patch_embed_size")
        if patch is None:
            return None
        return tuple(int(s) // int(p) for s, p in zip(self.configuration_manager.patch_size, patch))

    def configure_optimizers(self, stage: str = None):
        optimizer = torch.optim.AdamW(self.trainable_parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                      betas=(0.9, 0.98), fused=self.device.type == "cuda")
        scheduler = WarmupPolyLR(optimizer, self.num_epochs, self.warmup_epochs())
        self.print_to_log_file(f"AdamW lr {self.initial_lr}, linear warm-up {self.warmup_epochs()} epochs, then poly")
        return optimizer, scheduler

    def on_train_epoch_start(self):
        # one optimizer for the whole run: skip nnUNetTrainer_warmup's stage switching
        nnUNetTrainer.on_train_epoch_start(self)
        self._encoder_modules_eval()

    def load_checkpoint(self, filename_or_checkpoint):
        nnUNetTrainer.load_checkpoint(self, filename_or_checkpoint)


class nnsslPrimusFinetuneTrainer_full(nnsslPrimusFinetuneTrainer):
    pretrained_mode = "full"


class nnsslPrimusFinetuneTrainer_frozenEncoder(nnsslPrimusFinetuneTrainer):
    freeze_encoder = True


class nnsslPrimusFinetuneTrainer_150ep(nnsslPrimusFinetuneTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 150


class nnsslFinetuneTrainer_smoke(nnsslSmokeRun, nnsslFinetuneTrainer):
    pass


class nnsslPrimusFinetuneTrainer_smoke(nnsslSmokeRun, nnsslPrimusFinetuneTrainer):
    pass
