"""MASS mask generation: backends (slic, sam2, labels), post-processing and the per-case store.

    from nnssl_plugins.pretrain.masks import MaskStore
    store = MaskStore.open(path); len(store); store.mask(i); store.crop(i); store.shape; store.meta
"""
from nnssl_plugins.pretrain.masks.store import CroppedMask, MaskStore, write_store, STORE_EXT

__all__ = ["MaskStore", "CroppedMask", "write_store", "STORE_EXT", "store_path"]


def store_path(dataset, backend: str, case: str, plans: str = "nnsslPlans_MASS") -> str:
    """Path of a case's mask store (``$nnUNet_preprocessed/DatasetXXX/nnssl_masks/<plans>/<backend>/<case>.nnsslmask``)."""
    from nnssl_plugins.pretrain.masks.dataset import PreprocessedDataset

    return PreprocessedDataset(dataset, plans).store_path(backend, case)
