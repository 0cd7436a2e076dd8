"""Atomic file writes and safe loading: nothing half-written is ever readable under its final name."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

from nnssl_plugins.errors import UserInputError


@contextmanager
def atomic_path(final_path: str) -> Iterator[str]:
    """Yield a temporary path in the same folder; on success fsync + rename it to `final_path`.

    On any exception the temporary file is removed and `final_path` is left untouched.
    """
    folder = os.path.dirname(os.path.abspath(final_path)) or "."
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(final_path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(obj: Any, path: str, **kwargs) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=kwargs.pop("indent", 2), **kwargs)


def atomic_torch_save(obj: Any, path: str) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def numpy_safe_globals() -> list:
    """Numpy *data* types (arrays, scalars, dtypes — no callables) that stock nnU-Net checkpoints hold in their
    `logging` / `_best_ema` entries. Allow-listing them keeps `weights_only=True` loading of such files."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    out = [np.ndarray, np.dtype, core.multiarray.scalar, core.multiarray._reconstruct]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and isinstance(getattr(dtypes, n), type)]
    return out


def safe_torch_load(path: str, map_location="cpu", allow_numpy: bool = False) -> Any:
    """`torch.load(weights_only=True)` with a clear message for missing/corrupt/unsafe files.

    allow_numpy: also accept numpy arrays/scalars (stock nnU-Net checkpoints of our segmentation/classification
    trainers); still no arbitrary code can run while loading."""
    import pickle

    import torch

    if not os.path.isfile(path):
        raise UserInputError(f"{path}: file not found. Check the path to the checkpoint.")
    try:
        if allow_numpy:
            with torch.serialization.safe_globals(numpy_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserInputError(
            f"{path}: cannot be read as a safe (weights_only) torch checkpoint ({first[:200]}). "
            f"Use a checkpoint written by nnssl_plugins / nnU-Net, or re-save it without arbitrary Python objects."
        ) from None
