"""Case-level classification on top of a pretrained encoder.

* labels file: `$nnUNet_raw/DatasetXXX/classification_labels.json` = {"case_id": class_int, ...,
  optional "class_names": ["a", "b", ...]}
* `EncoderClassifier`: backbone modules taken from the dynamic-network-architectures segmentation
  network (same module names as the checkpoint, so `encoder.*` / `down_projection.*`, `eva.*` load
  directly) + `cls_head` = attention pooling (MASS protocol) + linear layer
* metrics (AUROC one-vs-rest, accuracy, balanced accuracy, confusion matrix) and the per-case CSV
"""
from __future__ import annotations

import csv
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.common.networks import build_primus_from_plans

LABELS_FILE = "classification_labels.json"


# ----------------------------------------------------------------------------------------------------------------
# labels
# ----------------------------------------------------------------------------------------------------------------
def labels_file_for(dataset_name: str) -> str:
    from nnunetv2.paths import nnUNet_raw

    if not nnUNet_raw:
        raise UserInputError("nnUNet_raw: environment variable not set. Export nnUNet_raw (the folder holding "
                             f"{dataset_name}/{LABELS_FILE}).")
    return os.path.join(str(nnUNet_raw), dataset_name, LABELS_FILE)


def load_classification_labels(path: str, required_cases: Optional[Sequence[str]] = None
                               ) -> Tuple[Dict[str, int], List[str]]:
    """Parse and validate a labels file. Returns ({case: class}, class_names)."""
    example = '{"case_001": 0, "case_002": 1, "class_names": ["benign", "malignant"]}'
    if not os.path.isfile(path):
        raise UserInputError(f"{path}: classification labels file not found. Create it with one entry per case, "
                             f"e.g. {example}.")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path}: not valid JSON ({e}). Expected e.g. {example}.") from None
    if not isinstance(raw, dict):
        raise UserInputError(f"{path}: must be a JSON object mapping case id -> class index, e.g. {example}.")
    class_names = raw.get("class_names")
    labels: Dict[str, int] = {}
    for k, v in raw.items():
        if k == "class_names":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or int(v) < 0:
            raise UserInputError(f"{path}: case '{k}' has label {v!r}; labels must be integers 0..K-1.")
        labels[str(k)] = int(v)
    if not labels:
        raise UserInputError(f"{path}: contains no case labels. Expected e.g. {example}.")
    present = sorted(set(labels.values()))
    num_classes = max(present) + 1
    if class_names is not None:
        if not isinstance(class_names, list) or len(class_names) < num_classes:
            raise UserInputError(f"{path}: 'class_names' must be a list with one name per class index "
                                 f"(need at least {num_classes}, got {class_names!r}).")
        class_names = [str(c) for c in class_names]
        num_classes = len(class_names)
    else:
        class_names = [str(i) for i in range(num_classes)]
    if len(present) < 2:
        raise UserInputError(f"{path}: all cases have class {present[0]}; classification needs at least two "
                             f"classes. Add cases of another class.")
    if required_cases is not None:
        missing = sorted(set(required_cases) - set(labels))
        if missing:
            shown = ", ".join(missing[:10]) + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
            raise UserInputError(f"{path}: no label for {len(missing)} case(s) of the dataset: {shown}. Add them to "
                                 f"the file (case id as in imagesTr without the _0000 suffix).")
    return labels, class_names


def balanced_class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=num_classes).astype(float)
    counts[counts == 0] = np.inf
    w = len(labels) / (num_classes * counts)
    return torch.tensor(w, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# network
# ----------------------------------------------------------------------------------------------------------------
class AttentionPoolingHead(nn.Module):
    """Learned query attends over the encoder tokens (attention pooling) -> LayerNorm -> Linear."""

    def __init__(self, dim: int, num_classes: int, num_heads: Optional[int] = None, dropout: float = 0.0):
        super().__init__()
        if num_heads is None:
            num_heads = max(1, dim // 64)
            while dim % num_heads:
                num_heads -= 1
        self.norm_in = nn.LayerNorm(dim)
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_out = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, K)
        x = self.norm_in(tokens)
        pooled, _ = self.attn(self.query.expand(x.shape[0], -1, -1), x, x, need_weights=False)
        return self.fc(self.drop(self.norm_out(pooled[:, 0])))


class EncoderClassifier(nn.Module):
    """Backbone of a ResidualEncoderUNet/PlainConvUNet (deepest encoder features) or Primus (eva tokens)
    under its original module names, plus `cls_head`."""

    def __init__(self, segmentation_network: nn.Module, num_classes: int):
        super().__init__()
        self.arch_name = type(segmentation_network).__name__
        if hasattr(segmentation_network, "eva"):
            self.kind = "primus"
            self.down_projection = segmentation_network.down_projection
            self.eva = segmentation_network.eva
            self.register_tokens = segmentation_network.register_tokens
            dim = int(segmentation_network.embed_dim)
        elif hasattr(segmentation_network, "encoder"):
            self.kind = "cnn"
            self.encoder = segmentation_network.encoder
            dim = int(self.encoder.output_channels[-1])
        else:
            raise UserInputError(f"architecture '{self.arch_name}': classification supports ResidualEncoderUNet / "
                                 f"PlainConvUNet and Primus backbones. Use plans from nnssl_transfer_plans.")
        self.cls_head = AttentionPoolingHead(dim, num_classes)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "cnn":
            feats = self.encoder(x)
            if isinstance(feats, (list, tuple)):
                feats = feats[-1]
            return feats.flatten(2).transpose(1, 2)
        x = self.down_projection(x)
        x = x.flatten(2).transpose(1, 2)  # == 'b c w h d -> b (w h d) c'
        n_reg = 0
        if self.register_tokens is not None:
            n_reg = self.register_tokens.shape[1]
            x = torch.cat((self.register_tokens.expand(x.shape[0], -1, -1), x), dim=1)
        x, _ = self.eva(x)
        return x[:, n_reg:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls_head(self.tokens(x))


def build_classifier(plans_manager, configuration_manager, num_input_channels: int, num_classes: int) -> nn.Module:
    """Segmentation network from the plans (Primus with input_shape = patch size), reduced to a classifier."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    name = configuration_manager.network_arch_class_name
    if "primus" in name.lower():
        seg = build_primus_from_plans(plans_manager, configuration_manager, num_input_channels, 2)
    else:
        seg = get_network_from_plans(name, configuration_manager.network_arch_init_kwargs,
                                     configuration_manager.network_arch_init_kwargs_req_import,
                                     num_input_channels, 2, allow_init=True, deep_supervision=False)
    return EncoderClassifier(seg, num_classes)


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------
def center_crop_or_pad(data: np.ndarray, shape: Sequence[int], pad_value: float = 0.0) -> np.ndarray:
    """(C, *spatial) -> (C, *shape): the whole case, centre-cropped / zero-padded to the patch."""
    out = np.full((data.shape[0], *[int(s) for s in shape]), pad_value, dtype=np.float32)
    src, dst = [slice(None)], [slice(None)]
    for have, want in zip(data.shape[1:], shape):
        want = int(want)
        if have >= want:
            start = (have - want) // 2
            src.append(slice(start, start + want))
            dst.append(slice(0, want))
        else:
            start = (want - have) // 2
            src.append(slice(0, have))
            dst.append(slice(start, start + have))
    out[tuple(dst)] = np.asarray(data[tuple(src)], dtype=np.float32)
    return out


# ----------------------------------------------------------------------------------------------------------------
# metrics / outputs
# ----------------------------------------------------------------------------------------------------------------
def classification_metrics(y_true: Sequence[int], probs: np.ndarray, class_names: Sequence[str]) -> dict:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, roc_auc_score

    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=float)
    k = probs.shape[1]
    pred = probs.argmax(1)
    res = {
        "num_cases": int(len(y_true)),
        "class_names": list(class_names),
        "accuracy": float(accuracy_score(y_true, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)) if len(y_true) else None,
        "confusion_matrix": confusion_matrix(y_true, pred, labels=list(range(k))).tolist(),
        "confusion_matrix_note": "rows: true class, columns: predicted class",
    }
    per_class = {}
    for c in range(k):
        pos = y_true == c
        if pos.any() and (~pos).any():
            per_class[class_names[c]] = float(roc_auc_score(pos.astype(int), probs[:, c]))
        else:
            per_class[class_names[c]] = None
    res["auroc_per_class_ovr"] = per_class
    valid = [v for v in per_class.values() if v is not None]
    if k == 2:
        res["auroc"] = per_class[class_names[1]]
    else:
        res["auroc"] = float(np.mean(valid)) if valid else None
    if res["auroc"] is None:
        res["auroc_note"] = "undefined: the validation cases contain a single class"
    return res


def write_probabilities_csv(path: str, case_ids: Sequence[str], probs: np.ndarray, class_names: Sequence[str],
                            true_labels: Optional[Sequence[Optional[int]]] = None) -> None:
    from nnssl_plugins.utils.io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            header = ["case_id", "predicted_class", "predicted_name"] + [f"prob_{c}" for c in class_names]
            if true_labels is not None:
                header.append("true_class")
            w.writerow(header)
            for i, cid in enumerate(case_ids):
                p = int(np.argmax(probs[i]))
                row = [cid, p, class_names[p] if p < len(class_names) else str(p)] + \
                      [f"{float(v):.6f}" for v in probs[i]]
                if true_labels is not None:
                    row.append("" if true_labels[i] is None else int(true_labels[i]))
                w.writerow(row)
