"""MASS pretraining trainer: wiring of pretrain/mass (model, loss, sampler) into nnU-Net's loop.

* network: `MASSModel` (encoder/decoder = the plans' ResidualEncoderUNet, + task encoder / query decoder / head);
* data: `MASSDataLoader` (reference + query crops of one scan, K mask tasks from the mask store) inside nnU-Net's
  Single/NonDetMultiThreadedAugmenter, exactly like `nnUNetTrainer.get_dataloaders`;
* loss: Dice + BCE per binary mask channel; optimizer LAMB (timm, lr 2e-3, wd 1e-5) + nnU-Net's PolyLRScheduler
  (`_onecycle` variant: one-cycle schedule per epoch), grad clip 1.0; bf16 autocast on GPU (base trainer);
* `_ema` variant: EMA (0.99) of the weights, saved as `network_weights` (what transfers downstream; a resumed
  run continues from the EMA weights);
* validation metric (progress.png "pseudo dice"): mean hard Dice of the query masks;
* masks: `prepare_pretraining_data` generates them (slic by default) before training; the trainer reads
  `$nnUNet_preprocessed/<ds>/nnssl_masks/<plans>/<backend>/` with backend = env `nnssl_mass_mask_backend`
  or the first of slic, labels, sam2 that has stores.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from timm.optim import Lamb

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.common.networks import unwrap_network
from nnssl_plugins.pretrain.masks import STORE_EXT
from nnssl_plugins.pretrain.masks.generate import generate_dataset
from nnssl_plugins.pretrain.mass.loss import hard_dice, mass_loss
from nnssl_plugins.pretrain.mass.model import build_mass_model
from nnssl_plugins.pretrain.mass.sampling import MASSDataLoader
from nnssl_plugins.trainers.pretrain_base import nnsslPretrainTrainer
from nnssl_plugins.trainers.smoke import nnsslSmokeRun

MASK_BACKEND_ENV = "nnssl_mass_mask_backend"
BACKEND_ORDER = ("slic", "labels", "sam2")


def mask_dir(dataset_name: str, plans_name: str, backend: str) -> str:
    return os.path.join(os.environ["nnUNet_preprocessed"], dataset_name, "nnssl_masks", plans_name, backend)


def find_mask_backend(dataset_name: str, plans_name: str, preferred: Optional[str] = None) -> str:
    preferred = preferred or os.environ.get(MASK_BACKEND_ENV)
    if preferred:
        return preferred
    for b in BACKEND_ORDER:
        d = mask_dir(dataset_name, plans_name, b)
        if os.path.isdir(d) and any(f.endswith(STORE_EXT) for f in os.listdir(d)):
            return b
    raise UserInputError(
        f"{os.path.dirname(mask_dir(dataset_name, plans_name, 'slic'))}: no MASS masks for plans {plans_name}. "
        f"Run nnssl_generate_masks -d {dataset_name} -p {plans_name} (or nnssl_pretrain -m MASS, which does it).")


class _OneCycleEpochs:
    """One-cycle LR (cosine warm-up over 30 % of epochs to max lr, cosine anneal), stepped per epoch like
    nnU-Net's PolyLRScheduler (`step(current_epoch)`)."""

    def __init__(self, optimizer, max_lr: float, num_epochs: int, pct_start: float = 0.3, div: float = 25.0,
                 final_div: float = 1e4):
        self.optimizer, self.max_lr, self.n, self.pct = optimizer, max_lr, max(1, num_epochs), pct_start
        self.lo, self.end = max_lr / div, max_lr / final_div
        self.step(0)

    def lr_at(self, epoch: int) -> float:
        t = epoch / self.n
        if t < self.pct:
            a, b, u = self.lo, self.max_lr, t / self.pct
        else:
            a, b, u = self.max_lr, self.end, (t - self.pct) / (1 - self.pct)
        return b + (a - b) * (1 + np.cos(np.pi * min(u, 1.0))) / 2

    def step(self, current_step=None):
        lr = self.lr_at(0 if current_step is None else current_step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def state_dict(self):
        return {}

    def load_state_dict(self, _):
        pass


class MASSPretrainTrainer(nnsslPretrainTrainer):
    method = "MASS"
    grad_clip: float = 1.0
    initial_lr_mass: float = 2e-3
    weight_decay_mass: float = 1e-5
    num_masks: int = 13          # K per sample, incl. the all-ones context mask
    crop_overlap: float = 0.67
    schedule: str = "poly"       # 'poly' | 'onecycle'
    ema_decay: Optional[float] = None
    mask_backend: Optional[str] = None  # None: env nnssl_mass_mask_backend or auto-detect

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.initial_lr_mass
        self.weight_decay = self.weight_decay_mass
        self._ema_state = None

    # ------------------------------------------------------------------ network
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = False):
        return build_mass_model(configuration_manager.network_arch_init_kwargs, num_input_channels,
                                patch_size=configuration_manager.patch_size)

    def configure_optimizers(self):
        opt = Lamb(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        if self.schedule == "onecycle":
            return opt, _OneCycleEpochs(opt, self.initial_lr, self.num_epochs)
        return opt, PolyLRScheduler(opt, self.initial_lr, self.num_epochs)

    # ------------------------------------------------------------------ data
    @classmethod
    def prepare_pretraining_data(cls, dataset_name: str, plans_name: str, options: dict) -> None:
        """Generate the mask stores (backend `--mask-backend`, default slic; options from
        `MASSPlanner.add_cli_arguments`) for cases that lack them."""
        options = options or {}
        backend = options.get("mask_backend") or cls.mask_backend or "slic"
        backend_options = {}
        if backend == "sam2":
            backend_options = {k: options[o] for k, o in (("checkpoint", "sam2_checkpoint"), ("config", "sam2_config"))
                               if options.get(o) is not None}
            backend_options["device"] = options.get("device") or "cpu"
        generate_dataset(dataset_name, plans_name, backend, backend_options=backend_options,
                         num_processes=int(options.get("np") or 1), progress=True)
        os.environ[MASK_BACKEND_ENV] = backend  # run_training runs in this process: the trainer picks it up

    def _mask_dir(self) -> str:
        plans_name = self.plans_manager.plans_name
        backend = find_mask_backend(self.plans_manager.dataset_name, plans_name, self.mask_backend)
        return mask_dir(self.plans_manager.dataset_name, plans_name, backend)

    def get_dataloaders(self):
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        ps = self.configuration_manager.patch_size
        pclip = (self.plans_manager.plans.get("nnssl") or {}).get("percentile_clip_channels") or []
        mdir = self._mask_dir()
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        kw = dict(num_masks=self.num_masks, overlap=self.crop_overlap, percentile_clip_channels=pclip)
        dl_tr = MASSDataLoader(dataset_tr, self.batch_size, ps, mdir, augment=True, **kw)
        dl_val = MASSDataLoader(dataset_val, self.batch_size, ps, mdir, augment=False, **kw)
        n = get_allowed_n_proc_DA()
        if n == 0:
            mt_tr, mt_val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        else:
            pin = self.device.type == "cuda"
            mt_tr = NonDetMultiThreadedAugmenter(dl_tr, None, n, max(6, n // 2), None, pin_memory=pin,
                                                 wait_time=0.002)
            mt_val = NonDetMultiThreadedAugmenter(dl_val, None, max(1, n // 2), max(3, n // 4), None,
                                                  pin_memory=pin, wait_time=0.002)
        _ = next(mt_tr)
        _ = next(mt_val)
        return mt_tr, mt_val

    # ------------------------------------------------------------------ steps
    def compute_loss(self, batch: dict):
        """batch (MASSDataLoader): query `data` [B, C, *P], its masks `target` [B, K, *P], reference `ref` and
        `ref_masks`."""
        logits = self.network(batch["ref"], batch["ref_masks"], batch["data"])
        target = batch["target"]
        loss, logs = mass_loss(logits, target)
        logs.pop("loss", None)
        if not self.network.training:
            # channel 0 is the all-ones context mask: report the Dice of the real mask tasks
            d = hard_dice(logits[:, 1:] if logits.shape[1] > 1 else logits,
                          target[:, 1:] if target.shape[1] > 1 else target)
            logs["hard_dice"] = float(d.mean())
        return loss, logs

    def train_step(self, batch: dict) -> dict:
        out = super().train_step(batch)
        self._ema_update()
        return out

    def validation_metric(self, collated: dict) -> float:
        v = collated.get("hard_dice")
        return float(np.mean(v)) if v is not None and len(v) else float("nan")

    # ------------------------------------------------------------------ EMA
    @torch.no_grad()
    def _ema_update(self):
        if not self.ema_decay:
            return
        sd = unwrap_network(self.network).state_dict()
        if self._ema_state is None:
            self._ema_state = {k: v.detach().clone() for k, v in sd.items()}
            return
        for k, v in sd.items():
            e = self._ema_state[k]
            if v.dtype.is_floating_point:
                e.mul_(self.ema_decay).add_(v.detach(), alpha=1 - self.ema_decay)
            else:
                e.copy_(v)

    def save_checkpoint(self, filename: str) -> None:
        if not self.ema_decay or self._ema_state is None:
            return super().save_checkpoint(filename)
        net = unwrap_network(self.network)
        raw = {k: v.detach().clone() for k, v in net.state_dict().items()}
        net.load_state_dict(self._ema_state)
        try:
            super().save_checkpoint(filename)
        finally:
            net.load_state_dict(raw)

    def adaptation_plan_extras(self) -> dict:
        return {"mass": {"num_masks": self.num_masks, "crop_overlap": self.crop_overlap, "schedule": self.schedule,
                         "ema_decay": self.ema_decay, "lr": self.initial_lr, "weight_decay": self.weight_decay,
                         "optimizer": "timm.optim.Lamb", "grad_clip": self.grad_clip,
                         "patch_size": [int(i) for i in self.configuration_manager.patch_size]}}


class MASSPretrainTrainer_smoke(nnsslSmokeRun, MASSPretrainTrainer):
    pass


class MASSPretrainTrainer_onecycle(MASSPretrainTrainer):
    schedule = "onecycle"


class MASSPretrainTrainer_ema(MASSPretrainTrainer):
    ema_decay = 0.99


class MASSPretrainTrainer_ema_smoke(nnsslSmokeRun, MASSPretrainTrainer_ema):
    pass
