"""The `nnssl_adaptation_plan` stored in every pretraining checkpoint.

Field names follow the DKFZ nnssl project's AdaptationPlan so its finetuning code can read our
checkpoints. Stored as a plain dict of str/int/float/list/dict/None, so checkpoints stay loadable
with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

from copy import deepcopy
from typing import Any, Optional, Sequence

from nnssl_plugins.errors import UserInputError

ADAPTATION_PLAN_KEY = "nnssl_adaptation_plan"
REQUIRED_FIELDS = (
    "architecture_plans",
    "pretrain_plan",
    "pretrain_num_input_channels",
    "recommended_downstream_patchsize",
    "key_to_encoder",
    "key_to_stem",
    "keys_to_in_proj",
    "key_to_lpe",
)

# Where the encoder / stem / input projection / learned pos-emb live in the backbones we use.
# Keys are the dynamic-network-architectures module names, so they are the same in the
# pretraining network (a superset) and in the downstream network.
BACKBONE_KEYS = {
    "ResidualEncoderUNet": dict(
        key_to_encoder="encoder.stages",
        key_to_stem="encoder.stem",
        keys_to_in_proj=["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"],
        key_to_lpe=None,
    ),
    "PlainConvUNet": dict(
        key_to_encoder="encoder.stages",
        key_to_stem="encoder.stages.0.0",
        keys_to_in_proj=["encoder.stages.0.0.convs.0.conv", "encoder.stages.0.0.convs.0.all_modules.0"],
        key_to_lpe=None,
    ),
    "Primus": dict(
        key_to_encoder="eva",
        key_to_stem="down_projection",
        keys_to_in_proj=["down_projection.proj"],
        key_to_lpe="eva.pos_embed",
    ),
}


def _plain(obj: Any) -> Any:
    """Recursively convert tuples/numpy scalars to JSON/weights_only-safe builtins."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def make_adaptation_plan(
    arch_class_name: str,
    arch_kwargs: dict,
    arch_kwargs_requiring_import: Sequence[str],
    pretrain_plan: dict,
    pretrain_num_input_channels: int,
    recommended_downstream_patchsize: Sequence[int],
    key_to_encoder: Optional[str] = None,
    key_to_stem: Optional[str] = None,
    keys_to_in_proj: Optional[Sequence[str]] = None,
    key_to_lpe: Optional[str] = None,
    **extra: Any,
) -> dict:
    short = arch_class_name.split(".")[-1]
    defaults = BACKBONE_KEYS.get(short, {})
    plan = {
        "architecture_plans": {
            "arch_class_name": arch_class_name,
            "arch_kwargs": deepcopy(arch_kwargs),
            "arch_kwargs_requiring_import": list(arch_kwargs_requiring_import),
        },
        "pretrain_plan": deepcopy(pretrain_plan),
        "pretrain_num_input_channels": int(pretrain_num_input_channels),
        "recommended_downstream_patchsize": [int(i) for i in recommended_downstream_patchsize],
        "key_to_encoder": key_to_encoder if key_to_encoder is not None else defaults.get("key_to_encoder"),
        "key_to_stem": key_to_stem if key_to_stem is not None else defaults.get("key_to_stem"),
        "keys_to_in_proj": list(keys_to_in_proj) if keys_to_in_proj is not None else list(defaults.get("keys_to_in_proj", [])),
        "key_to_lpe": key_to_lpe if key_to_lpe is not None else defaults.get("key_to_lpe"),
    }
    plan.update(extra)
    return _plain(plan)


def get_adaptation_plan(checkpoint: dict, source: str = "checkpoint") -> dict:
    """Return the plan of a loaded checkpoint dict, or a clear error if it is not one of ours."""
    if not isinstance(checkpoint, dict) or ADAPTATION_PLAN_KEY not in checkpoint:
        raise UserInputError(
            f"{source}: has no '{ADAPTATION_PLAN_KEY}' entry, so it is not an nnssl_plugins pretraining "
            f"checkpoint. Pass the checkpoint_final.pth (or checkpoint_latest.pth) written by one of our "
            f"*PretrainTrainer runs."
        )
    plan = checkpoint[ADAPTATION_PLAN_KEY]
    missing = [f for f in REQUIRED_FIELDS if f not in plan]
    if missing:
        raise UserInputError(f"{source}: '{ADAPTATION_PLAN_KEY}' lacks fields {missing}. Re-export the checkpoint.")
    return plan
