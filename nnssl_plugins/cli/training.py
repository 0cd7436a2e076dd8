"""What nnssl_pretrain and nnssl_finetune share: argument checks before anything is written, trainer lookup
through nnU-Net's own search, and nnU-Net's training loop run so that a rerun resumes or reports the result.
`resolve_device` ("cuda if available, else cpu") is also the -device default of nnssl_incontext_predict and
nnssl_generate_masks."""
from __future__ import annotations

import os

from nnssl_plugins.errors import UserInputError


def resolve_device(requested: str | None, num_gpus: int = 1) -> str:
    import torch

    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(f"-device {device}: no CUDA GPU visible. Use -device cpu.")
    if num_gpus > 1 and device != "cuda":
        raise UserInputError(f"-num_gpus {num_gpus}: more than one GPU needs -device cuda (nnU-Net's DDP runs "
                             f"on GPUs only). Use -num_gpus 1 on {device}.")
    if num_gpus > 1 and torch.cuda.device_count() < num_gpus:
        raise UserInputError(f"-num_gpus {num_gpus}: only {torch.cuda.device_count()} CUDA GPU(s) visible. "
                             f"Lower -num_gpus or check CUDA_VISIBLE_DEVICES.")
    return device


def find_trainer(trainer_name: str, given: str | None):
    """The trainer class via nnU-Net's search (our discovery folder added to nnUNet_extTrainer)."""
    from nnssl_plugins.cli.trainer_path import ensure_trainer_discovery

    ensure_trainer_discovery()
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        return recursive_find_trainer_class_by_name(trainer_name)
    except RuntimeError:
        raise UserInputError(f"-tr {given}: no trainer class {trainer_name}. Use e.g. -tr _smoke "
                             f"or a full class name.") from None


def train_resumable(dataset_name: str, trainer_name: str, plans_name: str, fold: str, device: str, step: str,
                    pretrained_weights: str | None = None, num_gpus: int = 1, force_continue: bool = False) -> str:
    """nnU-Net's run_training; resumes from checkpoint_latest, does nothing when checkpoint_final exists.
    Returns the fold's output folder."""
    import torch
    from nnunetv2.run.run_training import run_training

    if device == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, os.cpu_count() or 1))  # as nnUNetv2_train does on CPU
    out = os.path.join(os.environ["nnUNet_results"], dataset_name, f"{trainer_name}__{plans_name}__3d_fullres",
                       f"fold_{fold}")
    if os.path.isfile(os.path.join(out, "checkpoint_final.pth")):
        print(f"{step} Already finished: {os.path.join(out, 'checkpoint_final.pth')}")
        return out
    resume = force_continue or os.path.isfile(os.path.join(out, "checkpoint_latest.pth"))
    how = ", resuming" if resume else (f", loading {pretrained_weights}" if pretrained_weights else "")
    print(f"{step} Training {trainer_name} on {dataset_name} (fold {fold}, device {device}{how}) → {out}")
    run_training(dataset_name, "3d_fullres", fold, trainer_name, plans_name,
                 pretrained_weights=None if resume else pretrained_weights, num_gpus=num_gpus,
                 continue_training=resume, device=torch.device(device))
    print(f"Checkpoint: {os.path.join(out, 'checkpoint_final.pth')}")
    return out
