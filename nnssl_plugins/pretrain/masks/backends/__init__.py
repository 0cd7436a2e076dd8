"""Mask generation backends. Each backend is a class with

* ``name`` (str) and ``params`` (JSON-able dict recorded in every store header),
* ``generate(case: CaseInput) -> list[CroppedMask]`` (post-processed, deduplicated masks).

Registered by name in ``BACKENDS``; ``make_backend(name, **options)`` builds one.
"""
from __future__ import annotations

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


def make_backend(name: str, **options):
    from nnssl_plugins.errors import UserInputError

    if name == "slic":
        from nnssl_plugins.pretrain.masks.backends.slic import SlicBackend
        return SlicBackend(**options)
    if name == "labels":
        from nnssl_plugins.pretrain.masks.backends.labels import LabelsBackend
        return LabelsBackend(**options)
    if name == "sam2":
        from nnssl_plugins.pretrain.masks.backends.sam2 import Sam2Backend
        return Sam2Backend(**options)
    raise UserInputError(f"--backend {name}: unknown backend. Choose one of: {', '.join(BACKENDS)}.")


BACKENDS = ("slic", "sam2", "labels")
