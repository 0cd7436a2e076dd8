"""In-context inference (sliding window) and feature pictures for MASS.

`predict_volume` follows nnU-Net's sliding window: tiles from `compute_steps_for_sliding_window`,
Gaussian importance weighting from `compute_gaussian` (sigma 1/8, as nnU-Net), images smaller than the
patch are zero-padded (like nnU-Net's `pad_nd_image`) and cropped back. Probabilities (sigmoid) are
aggregated; thresholding (0.5) is left to the caller. The task embedding is computed once (cacheable).
The network runs under `nnssl_plugins.utils.precision.autocast` (bf16 on CUDA cards with native bf16,
fp16 on older ones, fp32 on CPU); probabilities are aggregated in fp32.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.mass.model import MASSModel, TaskEmbedding
from nnssl_plugins.utils.precision import autocast


def _as_tensor(image) -> torch.Tensor:
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not torch.is_tensor(image):
        raise UserInputError(f"image: expected a torch tensor or numpy array, got {type(image).__name__}.")
    return image


@torch.inference_mode()
def predict_volume(model: MASSModel, image, task_embedding: TaskEmbedding, patch_size: Sequence[int],
                   overlap: float = 0.5, device="cpu", batch_size: int = 1) -> torch.Tensor:
    """image [C, X, Y, Z] -> probabilities [K, X, Y, Z] (float32, CPU)."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

    image = _as_tensor(image)
    if image.ndim != 4:
        raise UserInputError(f"image: expected [C, X, Y, Z], got shape {tuple(image.shape)}.")
    if image.shape[0] != model.input_channels:
        raise UserInputError(f"image: has {image.shape[0]} channel(s) but the MASS model expects "
                             f"{model.input_channels}. Use the same channels/modalities as the reference.")
    if not 0 <= overlap < 1:
        raise UserInputError(f"overlap: must be in [0, 1), got {overlap}.")
    patch_size = tuple(int(p) for p in patch_size)
    device = torch.device(device)
    was_training = model.training
    model.eval()
    emb = task_embedding.to(device)
    if emb.batch_size != 1:
        emb = emb.mean_over_batch()
    K = emb.num_classes

    data, slicer = pad_nd_image(image.float(), patch_size, "constant", {"value": 0}, True, None)
    shape = tuple(data.shape[1:])
    steps = compute_steps_for_sliding_window(shape, patch_size, 1 - overlap)
    gaussian = compute_gaussian(patch_size, sigma_scale=1.0 / 8, value_scaling_factor=10, dtype=torch.float32,
                                device=device)
    agg = torch.zeros((K, *shape), dtype=torch.float32, device=device)
    weight = torch.zeros(shape, dtype=torch.float32, device=device)
    slices = [tuple(slice(s, s + p) for s, p in zip((sx, sy, sz), patch_size))
              for sx in steps[0] for sy in steps[1] for sz in steps[2]]
    for i in range(0, len(slices), batch_size):
        chunk = slices[i:i + batch_size]
        x = torch.stack([data[(slice(None), *sl)] for sl in chunk]).to(device)
        with autocast(device):
            logits = model.segment(x, emb)
        probs = torch.sigmoid(logits.float())
        for p, sl in zip(probs, chunk):
            agg[(slice(None), *sl)] += p * gaussian
            weight[sl] += gaussian
    agg /= weight
    model.train(was_training)
    return agg[(slice(None), *slicer[1:])].cpu()


@torch.inference_mode()
def decoder_features(model: MASSModel, image, task_embedding: Optional[TaskEmbedding] = None,
                     device="cpu") -> torch.Tensor:
    """Final decoder features [C0, X, Y, Z] of image [C, X, Y, Z] (whole volume, zero-padded to the stride).

    Without a task embedding this is the plain U-Net path (what transfers downstream).
    """
    image = _as_tensor(image)
    if image.ndim != 4:
        raise UserInputError(f"image: expected [C, X, Y, Z], got shape {tuple(image.shape)}.")
    if image.shape[0] != model.input_channels:
        raise UserInputError(f"image: has {image.shape[0]} channel(s) but the MASS model expects "
                             f"{model.input_channels}.")
    was_training = model.training
    model.eval()
    shape = image.shape[1:]
    pad = []
    for s, st in zip(reversed(shape), reversed(model.total_stride)):
        pad += [0, (-s) % st]
    x = F.pad(image.float(), pad)[None].to(device)
    emb = task_embedding.to(device) if task_embedding is not None else None
    if emb is not None and emb.batch_size != 1:
        emb = emb.mean_over_batch()
    feat = model.features(x, emb)[0]
    model.train(was_training)
    return feat[:, :shape[0], :shape[1], :shape[2]].cpu()


def pca_rgb(features: torch.Tensor, max_samples: int = 200_000, seed: int = 0) -> np.ndarray:
    """features [C, X, Y, Z] -> uint8 [X, Y, Z, 3]: first 3 principal components, 1-99 % scaled to 0-255."""
    f = _as_tensor(features).float()
    if f.ndim != 4:
        raise UserInputError(f"features: expected [C, X, Y, Z], got shape {tuple(f.shape)}.")
    C = f.shape[0]
    flat = f.reshape(C, -1).T  # [N, C]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(flat.shape[0], generator=g)[:max_samples]
    sample = flat[idx]
    mean = sample.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(sample - mean, full_matrices=False)
    comps = v[:3].T  # [C, <=3]
    proj = (flat - mean) @ comps
    if proj.shape[1] < 3:
        proj = torch.cat((proj, torch.zeros(proj.shape[0], 3 - proj.shape[1])), 1)
    ps = proj[idx]
    lo = torch.quantile(ps, 0.01, dim=0)
    hi = torch.quantile(ps, 0.99, dim=0)
    out = ((proj - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1) * 255
    return out.round().to(torch.uint8).reshape(*f.shape[1:], 3).numpy()
