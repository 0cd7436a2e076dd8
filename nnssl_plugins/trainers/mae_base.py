"""Shared trainer wiring of the ViT-MAE methods (Hi-End-MAE, MAESIL; model code in pretrain/mae_common).

* Network: the method model built from the plans' Primus `architecture` + plans["nnssl"]["settings"]
  (mask ratio, decoder, attended layers), *including* Primus's (untrained, frozen) `up_projection` for
  `downstream_num_classes` outputs, so checkpoint `network_weights` ⊇ every key of the downstream Primus
  (stock `-pretrained_weights` then loads without missing keys).
* Optimizer: AdamW lr 1e-4, betas (0.9, 0.95), wd 0.05 (no decay on norms/biases/pos-embed/tokens),
  linear warm-up (5 % of epochs) then cosine — `pretrain.mae_common.optim.configure_optimizer`.
* Validation: masked reconstruction loss + PSNR (logged as the progress.png metric). A reconstruction
  picture (input / masked / reconstruction, three centre slices) is written to
  `<output_folder>/reconstructions/epoch_XXXX.png` at the first epoch, every `picture_every` epochs and at
  the last epoch.

A method trainer sets `method`, `build_network_architecture` (with `mae_config_from_managers` +
`freeze_up_projection`) and `_method_loss(model, batch, return_pictures)`.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from batchgenerators.utilities.file_and_folder_operations import join

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.common.networks import unwrap_network
from nnssl_plugins.pretrain.mae_common.config import method_config_from_plans
from nnssl_plugins.pretrain.mae_common.metrics import psnr
from nnssl_plugins.pretrain.mae_common.optim import configure_optimizer
from nnssl_plugins.pretrain.mae_common.pictures import save_pictures_from_logs
from nnssl_plugins.trainers.pretrain_base import nnsslPretrainTrainer


def mae_config_from_managers(plans_manager, configuration_manager) -> dict:
    """Method config {arch_kwargs, method} for the configuration the trainer runs (Primus plans only)."""
    name = configuration_manager.network_arch_class_name
    if name.split(".")[-1] != "Primus":
        raise UserInputError(
            f"plans '{plans_manager.plans_name}': architecture '{name}' is not a Primus. MAE pretraining "
            f"(Hi-End-MAE, MAESIL) needs plans from `nnssl_plan_and_preprocess -m HiEndMAE|MAESIL`.")
    plans = {"configurations": {"c": {"architecture": {"arch_kwargs": configuration_manager.network_arch_init_kwargs},
                                      "patch_size": list(configuration_manager.patch_size)}},
             "nnssl": plans_manager.plans.get("nnssl")}
    return method_config_from_plans(plans, "c")


def freeze_up_projection(model: torch.nn.Module) -> torch.nn.Module:
    """The downstream decoder is carried for key transfer only: no gradients, no optimizer state."""
    if hasattr(model, "up_projection"):
        for p in model.up_projection.parameters():
            p.requires_grad_(False)
    return model


class _CallThrough:
    """Model handle for the method's compute_loss: calls go through the (DDP/compiled) wrapper, attribute
    reads (mask ratio, grid, ...) to the plain module."""

    def __init__(self, wrapped, inner):
        self._wrapped, self._inner = wrapped, inner

    def __call__(self, *args, **kwargs):
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class MAEPretrainTrainerBase(nnsslPretrainTrainer):
    """Shared MAE wiring; a subclass sets `method`, `build_network_architecture` and `_method_loss`."""

    initial_lr_mae: float = 1e-4
    weight_decay_mae: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.95)
    warmup_fraction: float = 0.05
    picture_every: int = 50

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.initial_lr_mae
        self.weight_decay = self.weight_decay_mae
        self._picture_epoch = -1

    # -- hooks ----------------------------------------------------------------------------------------
    def _method_loss(self, model, batch: dict, return_pictures: bool):
        """(loss, logs) of the method's `compute_loss` on `batch["data"]`; logs hold `visible_tokens` and, with
        return_pictures, `masked_image` / `reconstruction`."""
        raise NotImplementedError

    def configure_optimizers(self):
        warmup = int(round(self.warmup_fraction * self.num_epochs))
        return configure_optimizer(unwrap_network(self.network), self.num_epochs, warmup, lr=self.initial_lr,
                                   weight_decay=self.weight_decay, betas=self.betas)

    def _model(self):
        return _CallThrough(self.network, unwrap_network(self.network))

    def compute_loss(self, batch: dict) -> Tuple[torch.Tensor, Dict[str, float]]:
        loss, logs = self._method_loss(self._model(), batch, return_pictures=False)
        return loss, {"visible_tokens": float(logs["visible_tokens"])}

    def _picture_due(self) -> bool:
        e = self.current_epoch
        return self.local_rank == 0 and self._picture_epoch != e and (
            e == 0 or (e + 1) % max(1, self.picture_every) == 0 or e == self.num_epochs - 1)

    def validation_step(self, batch: dict) -> dict:
        batch = self.batch_to_device(batch)
        with self._autocast():
            loss, logs = self._method_loss(self._model(), batch, return_pictures=True)
        rec = logs["reconstruction"].float()
        ref = batch["data"].float()
        data_range = float(ref.max() - ref.min()) or 1.0
        out = {"loss": float(loss.detach().cpu()), "psnr": float(psnr(rec, ref, data_range))}
        if self._picture_due():
            self._picture_epoch = self.current_epoch
            keys = batch.get("keys")
            fn = join(self.output_folder, "reconstructions", f"epoch_{self.current_epoch:04d}.png")
            save_pictures_from_logs(fn, ref.cpu(), {k: logs[k].float().cpu() for k in ("masked_image", "reconstruction")},
                                    title=f"{self.method} epoch {self.current_epoch} "
                                          f"(case {keys[0] if keys is not None else '?'})")
            self.print_to_log_file(f"reconstruction picture: {fn}")
        return out

    def validation_metric(self, collated_val_outputs: dict) -> float:
        vals = [v for v in collated_val_outputs.get("psnr", []) if v == v and abs(v) != float("inf")]
        return float(sum(vals) / len(vals)) if vals else float("nan")

    def adaptation_plan_extras(self) -> dict:
        settings = (self.plans_manager.plans.get("nnssl") or {}).get("settings") or {}
        return {"mae": {"method_settings": settings.get("method", {}),
                        "downstream_num_classes": settings.get("downstream_num_classes", 2),
                        "ct_window_to_unit_range": (self.plans_manager.plans.get("nnssl") or {}).get(
                            "ct_window_to_unit_range")}}
