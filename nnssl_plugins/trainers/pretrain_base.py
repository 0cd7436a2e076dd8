"""Base class of every pretraining trainer: nnU-Net's loop, images only, nnssl checkpoints.

A method subclass implements two hooks and nothing else of the loop:
  * `build_network_architecture(...)` (nnU-Net's static hook) → the pretraining network, a superset
    of the backbone recorded in the plans (same module names),
  * `compute_loss(batch) -> (loss, logs)` on the loader's batch dict, every tensor of it already on the
    device (`batch["data"]`: preprocessed image patches [B, C, *patch]; a method's own loader may add keys).
Optional: `configure_optimizers` (default: nnU-Net's SGD + PolyLRScheduler), `get_dataloaders` (default:
nnU-Net's loader with `pretraining_transforms`), `prepare_pretraining_data` (a classmethod `nnssl_pretrain`
calls before training, e.g. MASS generates its masks), `adaptation_plan_extras` (method facts for the
checkpoint). Run length: nnU-Net's `num_epochs` / `num_iterations_per_epoch`; `_smoke` variants mix in
`trainers.smoke.nnsslSmokeRun`.

Reproducibility: set the class attribute `seed` or the environment variable `nnssl_seed` (wins). Then network
init and the python/numpy/torch global RNGs are seeded — nnU-Net's infinite DataLoader picks cases with the
*global* `np.random` (its own `rs` RandomState, created unseeded, only shuffles finite loaders; it is seeded too) —
again at every epoch start from (seed, rank, epoch), so a resumed run continues like an uninterrupted one. With
`nnUNet_n_proc_DA=0` (single-threaded augmentation) two runs are identical. Every DDP rank gets its own seeds
(`rank_seed`), so ranks draw different scans. Unseeded (default) keeps nnU-Net's behaviour: every process seeds
numpy from OS entropy, which also gives ranks different scans.
"""
from __future__ import annotations

import math
import os
import random
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, distributed as dist

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.common.adaptation import ADAPTATION_PLAN_KEY, _plain, make_adaptation_plan
from nnssl_plugins.pretrain.common.data import nnsslDatasetBlosc2, pretraining_transforms
from nnssl_plugins.pretrain.common.networks import strip_wrapper_prefixes, unwrap_network
from nnssl_plugins.utils.io import atomic_torch_save, safe_torch_load

SEED_ENV = "nnssl_seed"


def rank_seed(base: int, rank: int = 0, stream: int = 0) -> int:
    """A distinct 32-bit seed per (base seed, DDP rank, stream): stream 0 = global RNGs, 1 = train loader, 2 = val."""
    return (int(base) * 1_000_003 + int(rank) * 7919 + int(stream) * 104_729) % (2 ** 32)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def reseed_loader(augmenter, seed: int) -> bool:
    """Give the batchgenerators DataLoader behind a SingleThreadedAugmenter (or a bare DataLoader) a seeded
    `rs` (it picks the cases). Multi-process augmenters have already forked their workers: returns False."""
    dl = getattr(augmenter, "data_loader", augmenter)
    if not hasattr(dl, "rs") or hasattr(augmenter, "_processes"):
        return False
    dl.rs = np.random.RandomState(seed)
    return True


def seed_epoch(seed: int, rank: int, epoch: int, loaders=()) -> bool:
    """Seed the global RNGs and the loaders for (seed, DDP rank, epoch). False if a loader could not be seeded
    (multi-process augmentation)."""
    seeded = [reseed_loader(g, rank_seed(seed, rank, 3 * epoch + k + 1)) for k, g in enumerate(loaders)]
    seed_everything(rank_seed(seed, rank, 3 * epoch))
    return all(seeded)


class nnsslPretrainTrainer(nnUNetTrainer):
    method: str = None
    grad_clip: float = 12.0
    #: fixed seed (None: unseeded, nnU-Net's default); the env var nnssl_seed overrides it
    seed: Optional[int] = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        self.oversample_foreground_percent = 0.0
        #: lowest validation loss so far (checkpoint_best); saved under nnU-Net's checkpoint key `_best_ema`
        self.best_val_loss: Optional[float] = None

    # ------------------------------------------------------------------ hooks for methods
    def compute_loss(self, batch: dict) -> Tuple[torch.Tensor, Dict[str, float]]:
        """(loss, logs of floats) for one batch; every tensor of `batch` is on `self.device` already."""
        raise NotImplementedError

    @classmethod
    def prepare_pretraining_data(cls, dataset_name: str, plans_name: str, options: dict) -> None:
        """Method-specific data preparation that `nnssl_pretrain` runs after preprocessing and before training
        (`options`: its parsed arguments, including the method's own from `planner.add_cli_arguments`).
        Nothing by default."""

    def adaptation_plan_extras(self) -> dict:
        """Method-specific additions to the checkpoint's adaptation plan."""
        return {}

    # ------------------------------------------------------------------ nnU-Net hooks
    def effective_seed(self) -> Optional[int]:
        env = os.environ.get(SEED_ENV, "").strip()
        if env:
            try:
                return int(env)
            except ValueError:
                raise UserInputError(f"{SEED_ENV}={env!r}: must be an integer (or unset for unseeded runs).") from None
        return self.seed

    def initialize(self):
        s = self.effective_seed()
        if s is not None and not self.was_initialized:
            seed_everything(rank_seed(s))  # same network init on every rank (DDP also broadcasts rank 0's)
        super().initialize()
        if self.dataset_class.__name__ == "nnUNetDatasetBlosc2":
            self.dataset_class = nnsslDatasetBlosc2

    def _build_loss(self):
        return None  # the method's compute_loss is the loss

    def set_deep_supervision_enabled(self, enabled: bool):
        mod = unwrap_network(self.network)
        if hasattr(mod, "decoder") and hasattr(mod.decoder, "deep_supervision"):
            mod.decoder.deep_supervision = enabled

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        patch_size = tuple(self.configuration_manager.patch_size)
        mirror_axes = tuple(range(len(patch_size)))
        self.inference_allowed_mirroring_axes = mirror_axes
        return (0.0, 0.0), False, patch_size, mirror_axes

    @staticmethod
    def get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None):
        return pretraining_transforms(patch_size, mirror_axes)

    @staticmethod
    def get_validation_transforms(deep_supervision_scales, is_cascaded=False, foreground_labels=None,
                                  regions=None, ignore_label=None):
        return None

    def _autocast(self):
        # bf16 on GPUs that support it (no grad scaler needed); fp32 on CPU/MPS
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return autocast("cuda", dtype=dtype)
        return dummy_context()

    def batch_to_device(self, batch: dict) -> dict:
        """The batch with every tensor moved to the device (once per step; other entries, e.g. keys, as they are)."""
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train_step(self, batch: dict) -> dict:
        batch = self.batch_to_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss, logs = self.compute_loss(batch)
        use_scaler = self.grad_scaler is not None and self.device.type == "cuda" and not torch.cuda.is_bf16_supported()
        if use_scaler:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
        if use_scaler:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        return {"loss": float(loss.detach().cpu()), **{k: float(v) for k, v in logs.items()}}

    def validation_step(self, batch: dict) -> dict:
        batch = self.batch_to_device(batch)
        with self._autocast():
            loss, logs = self.compute_loss(batch)
        return {"loss": float(loss.detach().cpu()), **{k: float(v) for k, v in logs.items()}}

    def _mean_over_ranks(self, values: List[float]) -> float:
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, list(values))
            values = [v for g in gathered for v in g]
        return float(np.mean(values))

    def on_train_epoch_end(self, train_outputs: List[dict]):
        out = collate_outputs(train_outputs)
        self.logger.log("train_losses", self._mean_over_ranks(out["loss"]), self.current_epoch)

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        out = collate_outputs(val_outputs)
        self.logger.log("val_losses", self._mean_over_ranks(out["loss"]), self.current_epoch)
        metric = self.validation_metric(out)
        # progress.png plots a "pseudo dice" axis; reconstruction methods have none and log NaN
        self.logger.log("mean_fg_dice", float(metric), self.current_epoch)
        self.logger.log("dice_per_class_or_region", [float(metric)], self.current_epoch)

    def validation_metric(self, collated_val_outputs: dict) -> float:
        return float("nan")

    def on_epoch_end(self):
        self.logger.log("epoch_end_timestamps", time.time(), self.current_epoch)
        tr = self.logger.get_value("train_losses", step=-1)
        va = self.logger.get_value("val_losses", step=-1)
        self.print_to_log_file("train_loss", np.round(tr, decimals=4))
        self.print_to_log_file("val_loss", np.round(va, decimals=4))
        metric = self.logger.get_value("mean_fg_dice", step=-1)
        if not math.isnan(metric):
            self.print_to_log_file("val_metric", np.round(metric, decimals=4))
        dt = self.logger.get_value("epoch_end_timestamps", step=-1) - self.logger.get_value("epoch_start_timestamps", step=-1)
        self.print_to_log_file(f"Epoch time: {np.round(dt, decimals=2)} s")
        if (self.current_epoch + 1) % self.save_every == 0 and self.current_epoch != (self.num_epochs - 1):
            self.save_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))
        if self.best_val_loss is None or va < self.best_val_loss:
            self.best_val_loss = float(va)
            self.save_checkpoint(join(self.output_folder, "checkpoint_best.pth"))
        if self.local_rank == 0:
            self.logger.plot_progress_png(self.output_folder)
        self.current_epoch += 1

    def on_train_start(self):
        # resumability matters more than disk for long pretraining runs: checkpoint every few epochs
        self.save_every = max(1, min(10, self.num_epochs // 10))
        super().on_train_start()
        # a SIGKILL during an atomic checkpoint save leaves only its temp file (never a truncated .pth): drop it
        if self.local_rank == 0:
            for f in os.listdir(self.output_folder):
                if f.startswith(".checkpoint_") and f.endswith(".tmp"):
                    os.remove(os.path.join(self.output_folder, f))

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        s = self.effective_seed()
        if s is None:
            return
        # reseeded at every epoch from (seed, rank, epoch): a run resumed with --c continues exactly like an
        # uninterrupted one, and DDP ranks draw different cases
        ok = seed_epoch(s, self.local_rank, self.current_epoch, (self.dataloader_train, self.dataloader_val))
        if not ok and not getattr(self, "_warned_seed", False):
            self._warned_seed = True
            self.print_to_log_file(f"Seed {s}: augmentation worker processes (nnUNet_n_proc_DA > 0) are not "
                                   f"bit-reproducible; use nnUNet_n_proc_DA=0 for identical runs.")

    def on_epoch_start(self):
        self.logger.log("epoch_start_timestamps", time.time(), self.current_epoch)

    def perform_actual_validation(self, save_probabilities: bool = False):
        # pretraining has no segmentation to validate; the per-epoch reconstruction loss is the validation
        self.print_to_log_file("Pretraining finished: no segmentation validation for self-supervised training. "
                               f"Checkpoint: {join(self.output_folder, 'checkpoint_final.pth')}")

    # ------------------------------------------------------------------ checkpoints
    def adaptation_plan(self) -> dict:
        cm = self.configuration_manager
        return make_adaptation_plan(
            arch_class_name=cm.network_arch_class_name,
            arch_kwargs=cm.network_arch_init_kwargs,
            arch_kwargs_requiring_import=cm.network_arch_init_kwargs_req_import,
            nnunet_plans=self.plans_manager.plans,
            pretrain_num_input_channels=self.num_input_channels,
            recommended_downstream_patchsize=cm.patch_size,
            method=self.method,
            trainer_name=self.__class__.__name__,
            pretrain_configuration=self.configuration_name,
            **self.adaptation_plan_extras(),
        )

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        init_args = dict(self.my_init_kwargs)
        init_args["device"] = str(init_args.get("device", "cpu"))
        checkpoint = {
            "network_weights": unwrap_network(self.network).state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            # plain builtins only, so the file loads with torch.load(weights_only=True)
            "logging": _plain(self.logger.get_checkpoint()),
            # nnU-Net's key (stock load_checkpoint reads it); ours holds the lowest validation loss
            "_best_ema": None if self.best_val_loss is None else float(self.best_val_loss),
            "current_epoch": self.current_epoch + 1,
            "init_args": _plain(init_args),
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": None if self.inference_allowed_mirroring_axes is None
            else [int(i) for i in self.inference_allowed_mirroring_axes],
            ADAPTATION_PLAN_KEY: self.adaptation_plan(),
        }
        atomic_torch_save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's load_checkpoint, but files are read with torch.load(weights_only=True) (ours hold only
        builtins + tensors; nnU-Net 2.8 uses weights_only=False, and its dict branch is broken)."""
        if not self.was_initialized:
            self.initialize()
        ck = filename_or_checkpoint
        if isinstance(ck, str):
            ck = safe_torch_load(ck, map_location=self.device, allow_numpy=True)
        unwrap_network(self.network).load_state_dict(strip_wrapper_prefixes(ck["network_weights"]))
        self.my_init_kwargs = ck["init_args"]
        self.current_epoch = ck["current_epoch"]
        self.logger.load_checkpoint(ck["logging"])
        self.best_val_loss = ck["_best_ema"]
        if ck.get("inference_allowed_mirroring_axes") is not None:
            self.inference_allowed_mirroring_axes = tuple(ck["inference_allowed_mirroring_axes"])
        self.optimizer.load_state_dict(ck["optimizer_state"])
        if self.grad_scaler is not None and ck.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(ck["grad_scaler_state"])
        # nnU-Net stores the device as given; keep ours an object for the running process
        self.my_init_kwargs["device"] = self.device
