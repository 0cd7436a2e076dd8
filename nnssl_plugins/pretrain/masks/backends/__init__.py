"""Mask generation backends. Each backend is a class with

* ``name`` (str) and ``params`` (JSON-able dict recorded in every store header),
* ``generate(case: CaseInput) -> list[CroppedMask]`` (post-processed, deduplicated masks).

Registered by name in ``BACKENDS``; ``make_backend(name, **options)`` builds one. Options are the
backend constructor's keyword arguments; an unknown option is an error naming it and the valid ones.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np


@dataclass
class CaseInput:
    case_id: str
    image: np.ndarray                      # float32 (C, X, Y, Z), preprocessed (normalized) grid
    spacing: tuple                          # mm, preprocessed axis order
    hu_inverse: Optional[Dict[str, float]]  # CT: params to invert normalization to HU; None otherwise
    seg: Optional[np.ndarray] = None        # (1, X, Y, Z) nnU-Net preprocessed segmentation, if any
    extra: Dict[str, Any] = field(default_factory=dict)


def backend_class(name: str):
    from nnssl_plugins.errors import UserInputError

    if name == "slic":
        from nnssl_plugins.pretrain.masks.backends.slic import SlicBackend
        return SlicBackend
    if name == "labels":
        from nnssl_plugins.pretrain.masks.backends.labels import LabelsBackend
        return LabelsBackend
    if name == "sam2":
        require_sam2()
        from nnssl_plugins.pretrain.masks.backends.sam2 import Sam2Backend
        return Sam2Backend
    raise UserInputError(f"--backend {name}: unknown backend. Choose one of: {', '.join(BACKENDS)}.")


def backend_options(name: str) -> list:
    """The option names backend `name` accepts (its constructor's keyword arguments)."""
    params = inspect.signature(backend_class(name).__init__).parameters
    return [p for p, v in params.items() if p != "self" and v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]


def make_backend(name: str, **options):
    from nnssl_plugins.errors import UserInputError

    cls = backend_class(name)
    valid = backend_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UserInputError(
            f"--options: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for "
            f"--backend {name}. Valid options: {', '.join(sorted(valid))}.")
    return cls(**options)


BACKENDS = ("slic", "sam2", "labels")
SAM2_INSTALL = "SAM2_BUILD_CUDA=0 pip install --no-build-isolation 'sam2>=1.1.0'"


def require_sam2() -> None:
    """`sam2` is an optional dependency (extra `sam2`): one clear error when the SAM2 backend is chosen without it."""
    from nnssl_plugins.errors import UserInputError

    try:
        import sam2  # noqa: F401
    except ImportError:
        raise UserInputError(
            f"--backend sam2: the SAM2 mask backend needs the optional package 'sam2' (extra nnssl_plugins[sam2]), "
            f"which is not installed in this environment. Install it with `{SAM2_INSTALL}` (torch must be installed "
            f"first: sam2 builds against it), or choose --backend slic or labels.") from None
