"""Which precision to run a model in on a given device (one rule for the whole package).

* CUDA, compute capability >= 8.0 (Ampere and newer): bf16 autocast (native bf16, no grad scaler) and
  TF32 matmuls/convolutions (as SAM2's own examples do).
* CUDA, older cards: ``torch.cuda.is_bf16_supported()`` is true there too, but bf16 is *emulated* and slow,
  so bf16 is never chosen below 8.0: fp16 autocast where the caller allows it (training with a grad
  scaler, plain conv-net inference), else fp32.
* CPU / MPS / anything else: fp32 (no autocast).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch


def _as_device(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def native_bf16(device) -> bool:
    """True on a CUDA device with compute capability >= 8.0 (bf16 in hardware)."""
    device = _as_device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def autocast_dtype(device, allow_fp16: bool = True) -> Optional[torch.dtype]:
    """The autocast dtype for `device`, or None for fp32 (see the module docstring for the rule)."""
    device = _as_device(device)
    if device.type != "cuda":
        return None
    if native_bf16(device):
        return torch.bfloat16
    return torch.float16 if allow_fp16 else None


def autocast(device, allow_fp16: bool = True):
    """``torch.autocast`` with `autocast_dtype(device)`; a no-op context (fp32) where that is None."""
    dtype = autocast_dtype(device, allow_fp16)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(_as_device(device).type, dtype=dtype)


@contextlib.contextmanager
def tf32(device) -> Iterator[None]:
    """Allow TF32 matmuls/convolutions inside the block on cards that have it (cc >= 8.0); restored after."""
    if not native_bf16(device):
        yield
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
