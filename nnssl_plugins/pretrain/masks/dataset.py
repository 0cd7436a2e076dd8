"""Access to an nnU-Net preprocessed dataset (plans + .b2nd arrays) and the mask store paths.

Stores live at ``$nnUNet_preprocessed/DatasetXXX/nnssl_masks/<plans_name>/<backend>/<case>.nnsslmask``
(plus ``summary.json`` in the same folder).
"""
from __future__ import annotations

import json
import os
from typing import List, Optional

import numpy as np

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.masks.store import STORE_EXT
from nnssl_plugins.pretrain.masks.windows import hu_inverse_params

DEFAULT_PLANS = "nnsslPlans_MASS"
DEFAULT_CONFIGURATION = "3d_fullres"


def preprocessed_root() -> str:
    root = os.environ.get("nnUNet_preprocessed")
    if not root:
        raise UserInputError("nnUNet_preprocessed: environment variable not set. Set it to nnU-Net's preprocessed folder.")
    return root


def resolve_dataset_name(dataset: str | int) -> str:
    s = str(dataset)
    if s.startswith("Dataset"):
        return s
    try:
        did = int(s)
    except ValueError:
        raise UserInputError(f"-d {s}: not a dataset id or DatasetXXX_Name.") from None
    root = preprocessed_root()
    prefix = f"Dataset{did:03d}_"
    cands = sorted(d for d in (os.listdir(root) if os.path.isdir(root) else []) if d.startswith(prefix))
    if not cands:
        raise UserInputError(
            f"-d {did}: no folder {prefix}* in nnUNet_preprocessed ({root}); the dataset is not preprocessed. "
            f"Run nnssl_plan_and_preprocess -d {did} -m MASS first.")
    if len(cands) > 1:
        raise UserInputError(f"-d {did}: several preprocessed folders match ({cands}). Pass -d with the full name.")
    return cands[0]


class PreprocessedDataset:
    def __init__(self, dataset: str | int, plans_name: str = DEFAULT_PLANS,
                 configuration: str = DEFAULT_CONFIGURATION):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self.dataset_name = resolve_dataset_name(dataset)
        self.root = os.path.join(preprocessed_root(), self.dataset_name)
        self.plans_name = plans_name
        self.configuration_name = configuration
        plans_file = os.path.join(self.root, plans_name + ".json")
        if not os.path.isfile(plans_file):
            have = sorted(f[:-5] for f in os.listdir(self.root) if f.endswith(".json") and "lans" in f) if os.path.isdir(self.root) else []
            raise UserInputError(
                f"{plans_file}: plans not found (dataset not preprocessed with plans {plans_name!r}; available: {have}). "
                f"Run nnssl_plan_and_preprocess -d <ID> -m MASS, or pass -p with one of the available plans.")
        self.plans_file = plans_file
        with open(plans_file) as f:
            self.plans = json.load(f)
        pm = PlansManager(self.plans)
        try:
            self.cm = pm.get_configuration(configuration)
        except Exception:
            raise UserInputError(f"{plans_file}: has no configuration {configuration!r}.") from None
        self.spacing = [float(s) for s in self.cm.spacing]
        self.folder = os.path.join(self.root, self.cm.data_identifier)
        if not os.path.isdir(self.folder):
            raise UserInputError(
                f"{self.folder}: preprocessed data folder missing (plans exist but preprocessing did not run). "
                f"Run nnUNetv2_preprocess -d <ID> -plans_name {plans_name} -c {configuration}.")
        self.identifiers: List[str] = sorted(
            f[:-5] for f in os.listdir(self.folder) if f.endswith(".b2nd") and not f.endswith("_seg.b2nd"))
        if not self.identifiers:
            raise UserInputError(f"{self.folder}: no preprocessed .b2nd images. Run preprocessing for plans {plans_name!r}.")
        ds_json = os.path.join(self.root, "dataset.json")
        self.dataset_json = json.load(open(ds_json)) if os.path.isfile(ds_json) else {}

    # ------------------------------------------------------------------ modality
    def hu_inverse(self, c: int = 0):
        return hu_inverse_params(self.plans, self.configuration_name, c)

    # ------------------------------------------------------------------ arrays
    def _open(self, path):
        import blosc2

        if not os.path.isfile(path):
            raise UserInputError(f"{path}: not found. Rerun preprocessing for this dataset.")
        try:
            return blosc2.open(urlpath=path, mode="r")
        except Exception as e:
            raise UserInputError(f"{path}: cannot be read ({type(e).__name__}: {e}). Rerun preprocessing.") from None

    def image_shape(self, case: str):
        return tuple(int(s) for s in self._open(os.path.join(self.folder, case + ".b2nd")).shape)

    def load_image(self, case: str) -> np.ndarray:
        """float32 (C, X, Y, Z) preprocessed image."""
        arr = np.asarray(self._open(os.path.join(self.folder, case + ".b2nd"))[...], dtype=np.float32)
        if arr.ndim != 4 or min(arr.shape[1:]) < 2:
            raise UserInputError(
                f"{os.path.join(self.folder, case + '.b2nd')}: image shape {arr.shape[1:]} is not a 3D volume. "
                "MASS mask generation needs 3D images (use a 3d_fullres configuration of a 3D dataset).")
        return arr

    def load_seg(self, case: str) -> Optional[np.ndarray]:
        p = os.path.join(self.folder, case + "_seg.b2nd")
        if not os.path.isfile(p):
            return None
        return np.asarray(self._open(p)[...])

    def is_labeled(self) -> bool:
        labels = self.dataset_json.get("labels") or {}
        return any(int(v) > 0 if not isinstance(v, (list, tuple)) else True for k, v in labels.items() if k != "background")

    # ------------------------------------------------------------------ stores
    def store_dir(self, backend: str) -> str:
        return os.path.join(self.root, "nnssl_masks", self.plans_name, backend)

    def store_path(self, backend: str, case: str) -> str:
        return os.path.join(self.store_dir(backend), case + STORE_EXT)


def shard_cases(cases: List[str], shard: Optional[str]) -> List[str]:
    """``i/N``: the i-th (0-based) of N interleaved parts of the sorted case list."""
    cases = sorted(cases)
    if not shard:
        return cases
    try:
        i, n = (int(x) for x in shard.split("/"))
        assert n >= 1 and 0 <= i < n
    except Exception:
        raise UserInputError(f"--shard {shard}: expected i/N with 0 <= i < N (e.g. 0/4).") from None
    return cases[i::n]
