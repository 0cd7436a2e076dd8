"""The `nnssl_adaptation_plan` of a pretraining checkpoint, as a typed dataclass.

What we write (`AdaptationPlan.to_dict`) is read by both upstreams, measured in tests/test_interop_*.py:

* DKFZ nnssl (`AdaptationPlan.from_dict` + `AbstractBaseTrainer.verify_adaptation_plans`): the nnssl fields,
  `pretrain_plan` in nnssl's Plan / ConfigurationPlan shape (the pretraining configuration only), short
  architecture names: `ResidualEncoderUNet` / `PlainConvUNet` with nnssl's DynamicArchitecturePlans kwargs, a
  Primus that equals a named preset as `PrimusS/B/M/L` with `arch_kwargs` None.
* nnU-Net master (`preprocess_like_nnssl` + `PretrainedTrainer`, `PretrainedTrainer_Primus[x]`): the same fields;
  a Primus that is no named preset is written as `Primus` with the `encoder_eva_depth` / `encoder_eva_numheads`
  kwargs `PretrainedTrainer_Primusx` reads. nnssl cannot describe such a Primus (it knows the presets only).

Our full nnU-Net plans travel under `nnunet_plans` (+ `pretrain_configuration`, `method`, `trainer_name`, method
settings); both upstreams ignore keys they do not know. `to_dict()` holds only builtins, so checkpoints keep
loading with `torch.load(weights_only=True)`.

`AdaptationPlan.from_dict` also reads the layout nnssl_plugins wrote before (full nnU-Net plans as `pretrain_plan`,
dotted class names) and DKFZ nnssl's own checkpoints (presets `ResEncL`, `NoSkipResEncL`, `PrimusS/B/M/L`, or
explicit ResidualEncoderUNet kwargs); `nnunet_architecture()` expands every one of them into an nnU-Net plans
`architecture` entry.
"""
from __future__ import annotations

from copy import deepcopy
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.common.networks import RESENC_CLASS, resenc_architecture

ADAPTATION_PLAN_KEY = "nnssl_adaptation_plan"
# the fields of nnssl's AdaptationPlan (nnssl/adaptation_planning/adaptation_plan.py)
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

PLAINCONV_CLASS = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
PRIMUS_CLASS = "dynamic_network_architectures.architectures.primus.Primus"

# nnssl's named CNN presets (nnssl/architectures/architecture_registry.py). NoSkipResEncL has the ResEncL encoder
# (same module names and shapes) and a decoder without skips: downstream it becomes a ResEncL U-Net whose
# decoder starts fresh.
RESENC_L = resenc_architecture([32, 64, 128, 256, 320, 320], [1, 3, 4, 6, 6, 6])
RESENC_L_KWARGS = RESENC_L["arch_kwargs"]
CNN_KW_REQUIRES_IMPORT = RESENC_L["_kw_requires_import"]
CNN_PRESETS = {"ResEncL": RESENC_L, "NoSkipResEncL": RESENC_L}

# Named Primus presets as nnssl and nnU-Net master build them: dynamic-network-architectures' PrimusS/B/M/L with
# 8^3 patches (those classes use layer scale 0.1 and the inner attention norm).
PRIMUS_PRESETS = {
    "PrimusS": {"embed_dim": 396, "eva_depth": 12, "eva_numheads": 6},
    "PrimusB": {"embed_dim": 792, "eva_depth": 12, "eva_numheads": 12},
    "PrimusM": {"embed_dim": 864, "eva_depth": 16, "eva_numheads": 12},
    "PrimusL": {"embed_dim": 1056, "eva_depth": 24, "eva_numheads": 16},
}
PRIMUS_PRESET_COMMON = {"patch_embed_size": [8, 8, 8], "init_values": 0.1, "scale_attn_inner": True}
# nnU-Net master finetunes named presets with drop_path_rate 0.2 (PretrainedTrainer_Primusx)
PRIMUS_FINETUNE_DROP_PATH = 0.2
# Primus kwargs that hold no parameters: they may differ from a preset without changing the checkpoint
_PRIMUS_PARAMETER_FREE = ("input_shape", "drop_path_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate")

# Where the encoder / stem / input projection / learned pos-emb live in the backbones we use (network side).
# Keys are dynamic-network-architectures module names, so they are the same in the pretraining network
# (a superset) and in the downstream network.
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


def short_class_name(name: str) -> str:
    return str(name).split(".")[-1]


def backbone_class(arch_class_name: str) -> str:
    """The dynamic-network-architectures class a (preset) name builds downstream: ResEncL -> ResidualEncoderUNet,
    PrimusM -> Primus, dotted names -> their last part."""
    short = short_class_name(arch_class_name)
    if short in CNN_PRESETS:
        return "ResidualEncoderUNet"
    if short in PRIMUS_PRESETS:
        return "Primus"
    return short


def primus_preset_name(arch_kwargs: dict) -> Optional[str]:
    """`PrimusS/B/M/L` if the Primus kwargs build exactly that named preset (same parameters), else None."""
    structural = _plain({k: v for k, v in arch_kwargs.items() if k not in _PRIMUS_PARAMETER_FREE})
    for name, preset in PRIMUS_PRESETS.items():
        if structural == _plain({**preset, **PRIMUS_PRESET_COMMON}):
            return name
    return None


@dataclass
class ArchitecturePlans:
    """nnssl's ArchitecturePlans: a short or preset class name, explicit kwargs (or None for presets)."""

    arch_class_name: str
    arch_kwargs: Optional[dict] = None
    arch_kwargs_requiring_import: Optional[List[str]] = None

    @classmethod
    def from_nnunet(cls, architecture: dict) -> "ArchitecturePlans":
        """How nnssl / nnU-Net master name an nnU-Net plans `architecture` entry."""
        name = short_class_name(architecture["network_class_name"])
        kw = deepcopy(architecture["arch_kwargs"])
        if name == "Primus":
            preset = primus_preset_name(kw)
            if preset is not None:
                return cls(preset, None, None)
            # nnU-Net master's PretrainedTrainer_Primusx builds Primus(embed_dim, patch_embed_size,
            # encoder_eva_depth, encoder_eva_numheads, scale_attn_inner, init_values) from these keys
            kw = {k: v for k, v in kw.items() if k != "input_shape"}
            kw.update(encoder_eva_depth=kw["eva_depth"], encoder_eva_numheads=kw["eva_numheads"],
                      scale_attn_inner=kw.get("scale_attn_inner", False), init_values=kw.get("init_values"))
            return cls("Primus", kw, [])
        return cls(name, kw, list(architecture.get("_kw_requires_import") or []))

    def nnunet_architecture(self, pretrain_patch_size: Sequence[int], source: str = "checkpoint") -> dict:
        """The explicit nnU-Net plans `architecture` entry (presets expanded)."""
        name = short_class_name(self.arch_class_name)
        if name in CNN_PRESETS:
            return deepcopy(CNN_PRESETS[name])
        if name in PRIMUS_PRESETS:
            kw = {**deepcopy(PRIMUS_PRESETS[name]), **deepcopy(PRIMUS_PRESET_COMMON)}
        elif name == "Primus" and self.arch_kwargs and "encoder_eva_depth" in self.arch_kwargs:
            a = self.arch_kwargs  # what nnU-Net master's PretrainedTrainer_Primusx reads
            kw = {"embed_dim": a["embed_dim"], "patch_embed_size": list(a["patch_embed_size"]),
                  "eva_depth": a["encoder_eva_depth"], "eva_numheads": a["encoder_eva_numheads"],
                  "scale_attn_inner": a["scale_attn_inner"], "init_values": a["init_values"]}
        elif name in ("ResidualEncoderUNet", "PlainConvUNet") and self.arch_kwargs:
            cls_name = RESENC_CLASS if name == "ResidualEncoderUNet" else PLAINCONV_CLASS
            return {"network_class_name": cls_name, "arch_kwargs": deepcopy(self.arch_kwargs),
                    "_kw_requires_import": list(self.arch_kwargs_requiring_import or CNN_KW_REQUIRES_IMPORT)}
        else:
            raise UserInputError(
                f"{source}: pretrained architecture '{self.arch_class_name}' (arch_kwargs "
                f"{'given' if self.arch_kwargs else 'None'}) is not supported. Supported: the nnssl presets "
                f"{sorted(CNN_PRESETS) + sorted(PRIMUS_PRESETS)}, ResidualEncoderUNet/PlainConvUNet with explicit "
                f"arch_kwargs, and checkpoints of nnssl_plugins.")
        kw["drop_path_rate"] = PRIMUS_FINETUNE_DROP_PATH
        kw["input_shape"] = [int(i) for i in pretrain_patch_size]
        return {"network_class_name": PRIMUS_CLASS, "arch_kwargs": kw, "_kw_requires_import": []}


def nnssl_pretrain_plan(plans: dict, configuration: str) -> dict:
    """nnU-Net plans -> nnssl's Plan shape holding only the pretraining configuration (as nnssl's trainers save it).

    nnssl's `spacing_style` knows 'onemmiso', 'median' and 'noresample'; our planners resample to a fixed spacing,
    written as 'onemmiso' when it is 1 mm isotropic and 'fixed' otherwise (only nnssl's own preprocessing reads
    the style; every consumer of a checkpoint reads `spacing`)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cfg = PlansManager(plans).get_configuration(configuration).configuration
    spacing = [float(s) for s in cfg["spacing"]]
    return _plain({
        "dataset_name": plans["dataset_name"],
        "plans_name": plans["plans_name"],
        "original_median_spacing_after_transp": plans["original_median_spacing_after_transp"],
        "image_reader_writer": plans["image_reader_writer"],
        "transpose_forward": plans["transpose_forward"],
        "transpose_backward": plans["transpose_backward"],
        "configurations": {configuration: {
            "data_identifier": cfg["data_identifier"],
            "preprocessor_name": cfg["preprocessor_name"],
            "spacing_style": "onemmiso" if spacing == [1.0, 1.0, 1.0] else "fixed",
            "normalization_schemes": cfg["normalization_schemes"],
            "use_mask_for_norm": cfg["use_mask_for_norm"],
            "resampling_fn_data": cfg["resampling_fn_data"],
            "resampling_fn_data_kwargs": cfg["resampling_fn_data_kwargs"],
            "resampling_fn_mask": cfg["resampling_fn_seg"],
            "resampling_fn_mask_kwargs": cfg["resampling_fn_seg_kwargs"],
            "spacing": spacing,
            "patch_size": [int(i) for i in cfg["patch_size"]],
        }},
        "experiment_planner_used": plans["experiment_planner_used"],
    })


def _is_nnunet_plans(pretrain_plan: dict) -> bool:
    """The layout nnssl_plugins wrote before nnssl interop: full nnU-Net plans (configurations hold an
    `architecture`; nnssl's ConfigurationPlan never does)."""
    return any("architecture" in c or "inherits_from" in c for c in pretrain_plan["configurations"].values())


@dataclass
class AdaptationPlan:
    """Typed view of `checkpoint['nnssl_adaptation_plan']`; the first eight fields are nnssl's AdaptationPlan."""

    architecture_plans: ArchitecturePlans
    pretrain_plan: dict                       # nnssl's Plan shape, the pretraining configuration only
    pretrain_num_input_channels: int
    recommended_downstream_patchsize: List[int]
    key_to_encoder: str
    key_to_stem: str
    keys_to_in_proj: List[str]
    key_to_lpe: Optional[str] = None
    # nnssl_plugins additions (None for checkpoints written by DKFZ nnssl)
    nnunet_plans: Optional[dict] = None       # the full nnU-Net plans of the pretraining run
    pretrain_configuration: Optional[str] = None
    method: Optional[str] = None
    trainer_name: Optional[str] = None
    extras: Dict[str, Any] = field(default_factory=dict)  # method settings ('mdae', 'mass', 'mae', ...)

    # ------------------------------------------------------------------------------------------------ writing
    @classmethod
    def for_pretraining(cls, nnunet_plans: dict, configuration: str, num_input_channels: int, *,
                        architecture: Optional[dict] = None,
                        recommended_downstream_patchsize: Optional[Sequence[int]] = None,
                        method: Optional[str] = None, trainer_name: Optional[str] = None,
                        key_to_encoder: Optional[str] = None, key_to_stem: Optional[str] = None,
                        keys_to_in_proj: Optional[Sequence[str]] = None, key_to_lpe: Optional[str] = None,
                        **extras: Any) -> "AdaptationPlan":
        """The plan of a pretraining run on `nnunet_plans[configuration]`; `architecture` (an nnU-Net plans
        architecture entry) defaults to that configuration's."""
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        cfg = PlansManager(nnunet_plans).get_configuration(configuration).configuration
        architecture = architecture if architecture is not None else cfg["architecture"]
        keys = dict(BACKBONE_KEYS.get(short_class_name(architecture["network_class_name"]), {}))
        given = dict(key_to_encoder=key_to_encoder, key_to_stem=key_to_stem, key_to_lpe=key_to_lpe,
                     keys_to_in_proj=None if keys_to_in_proj is None else list(keys_to_in_proj))
        keys.update({k: v for k, v in given.items() if v is not None})
        patch = cfg["patch_size"] if recommended_downstream_patchsize is None else recommended_downstream_patchsize
        return cls(
            architecture_plans=ArchitecturePlans.from_nnunet(architecture),
            pretrain_plan=nnssl_pretrain_plan(nnunet_plans, configuration),
            pretrain_num_input_channels=int(num_input_channels),
            recommended_downstream_patchsize=[int(i) for i in patch],
            key_to_encoder=keys.get("key_to_encoder"),
            key_to_stem=keys.get("key_to_stem"),
            keys_to_in_proj=list(keys.get("keys_to_in_proj") or []),
            key_to_lpe=keys.get("key_to_lpe"),
            nnunet_plans=deepcopy(nnunet_plans),
            pretrain_configuration=configuration,
            method=method,
            trainer_name=trainer_name,
            extras=deepcopy(extras),
        )

    def to_dict(self) -> dict:
        """Plain builtins (weights_only-safe); method settings sit at the top level."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extras"}
        d["architecture_plans"] = asdict(self.architecture_plans)
        clash = sorted(set(self.extras) & set(d))
        if clash:
            raise ValueError(f"adaptation plan extras {clash} collide with plan fields")
        d.update(self.extras)
        return _plain(d)

    # ------------------------------------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, data: dict, source: str = "checkpoint") -> "AdaptationPlan":
        if not isinstance(data, dict):
            raise UserInputError(f"{source}: '{ADAPTATION_PLAN_KEY}' is not a dict. Re-export the checkpoint.")
        missing = [f for f in REQUIRED_FIELDS if f not in data]
        if missing:
            raise UserInputError(f"{source}: '{ADAPTATION_PLAN_KEY}' lacks fields {missing}. Re-export the checkpoint.")
        pretrain_plan = data["pretrain_plan"]
        if not isinstance(pretrain_plan, dict) or not isinstance(pretrain_plan.get("configurations"), dict) \
                or not pretrain_plan["configurations"]:
            raise UserInputError(f"{source}: '{ADAPTATION_PLAN_KEY}.pretrain_plan' has no configurations. Re-export "
                                 f"the checkpoint with its pretraining plans.")
        arch = data["architecture_plans"]
        architecture_plans = ArchitecturePlans(arch["arch_class_name"], deepcopy(arch.get("arch_kwargs")),
                                               deepcopy(arch.get("arch_kwargs_requiring_import")))
        nnunet_plans = deepcopy(data.get("nnunet_plans"))
        configuration = data.get("pretrain_configuration") or next(iter(pretrain_plan["configurations"]))
        pretrain_plan = deepcopy(pretrain_plan)
        if nnunet_plans is None and _is_nnunet_plans(pretrain_plan):
            # written by nnssl_plugins before nnssl interop: read it as the current layout
            from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

            nnunet_plans = pretrain_plan
            pretrain_plan = nnssl_pretrain_plan(nnunet_plans, configuration)
            architecture_plans = ArchitecturePlans.from_nnunet(
                PlansManager(nnunet_plans).get_configuration(configuration).configuration["architecture"])
        known = {f.name for f in fields(cls)}
        return cls(
            architecture_plans=architecture_plans,
            pretrain_plan=pretrain_plan,
            pretrain_num_input_channels=int(data["pretrain_num_input_channels"]),
            recommended_downstream_patchsize=[int(i) for i in data["recommended_downstream_patchsize"]],
            key_to_encoder=data["key_to_encoder"],
            key_to_stem=data["key_to_stem"],
            keys_to_in_proj=list(data["keys_to_in_proj"] or []),
            key_to_lpe=data.get("key_to_lpe"),
            nnunet_plans=nnunet_plans,
            pretrain_configuration=configuration,
            method=data.get("method"),
            trainer_name=data.get("trainer_name"),
            extras={k: deepcopy(v) for k, v in data.items() if k not in known},
        )

    # ------------------------------------------------------------------------------------------------ derived
    @property
    def written_by_nnssl(self) -> bool:
        """True for checkpoints of DKFZ nnssl (no nnU-Net plans inside)."""
        return self.nnunet_plans is None

    def pretrain_configuration_plan(self) -> dict:
        """The pretraining configuration in nnssl's ConfigurationPlan shape."""
        return self.pretrain_plan["configurations"][self.pretrain_configuration]

    def pretrain_patch_size(self) -> List[int]:
        """The patch size the network saw during pretraining (nnU-Net master's `pt_used_patchsize`)."""
        return [int(i) for i in self.pretrain_configuration_plan()["patch_size"]]

    def nnunet_architecture(self, source: str = "checkpoint") -> dict:
        """The pretrained backbone as an explicit nnU-Net plans `architecture` entry."""
        if self.nnunet_plans is not None:
            from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

            cfg = PlansManager(self.nnunet_plans).get_configuration(self.pretrain_configuration).configuration
            return deepcopy(cfg["architecture"])
        return self.architecture_plans.nnunet_architecture(self.pretrain_patch_size(), source)

    def backbone_class(self) -> str:
        """ResidualEncoderUNet, PlainConvUNet or Primus: the class the backbone is downstream."""
        return backbone_class(self.architecture_plans.arch_class_name)

    def source_token_grid(self) -> Optional[Tuple[int, ...]]:
        """Token grid of a pretrained ViT: pretraining patch size // patch_embed_size (None for CNNs)."""
        patch = self.nnunet_architecture()["arch_kwargs"].get("patch_embed_size")
        if patch is None:
            return None
        return tuple(int(s) // int(p) for s, p in zip(self.pretrain_patch_size(), patch))


def make_adaptation_plan(
    arch_class_name: str,
    arch_kwargs: dict,
    arch_kwargs_requiring_import: Sequence[str],
    nnunet_plans: dict,
    pretrain_num_input_channels: int,
    recommended_downstream_patchsize: Sequence[int],
    key_to_encoder: Optional[str] = None,
    key_to_stem: Optional[str] = None,
    keys_to_in_proj: Optional[Sequence[str]] = None,
    key_to_lpe: Optional[str] = None,
    pretrain_configuration: str = "3d_fullres",
    **extra: Any,
) -> dict:
    """The checkpoint entry (plain dict) for a pretraining run with the full nnU-Net plans `nnunet_plans`."""
    return AdaptationPlan.for_pretraining(
        nnunet_plans, pretrain_configuration, pretrain_num_input_channels,
        architecture={"network_class_name": arch_class_name, "arch_kwargs": arch_kwargs,
                      "_kw_requires_import": list(arch_kwargs_requiring_import)},
        recommended_downstream_patchsize=recommended_downstream_patchsize, key_to_encoder=key_to_encoder,
        key_to_stem=key_to_stem, keys_to_in_proj=keys_to_in_proj, key_to_lpe=key_to_lpe, **extra,
    ).to_dict()


def get_adaptation_plan(checkpoint: dict, source: str = "checkpoint") -> AdaptationPlan:
    """The typed plan of a loaded checkpoint dict (ours, older ours, or DKFZ nnssl's), or a clear error."""
    if not isinstance(checkpoint, dict) or ADAPTATION_PLAN_KEY not in checkpoint:
        raise UserInputError(
            f"{source}: has no '{ADAPTATION_PLAN_KEY}' entry, so it is not a pretraining checkpoint of "
            f"nnssl_plugins or DKFZ nnssl. Pass the checkpoint_final.pth (or checkpoint_latest.pth) of a "
            f"pretraining run."
        )
    return AdaptationPlan.from_dict(checkpoint[ADAPTATION_PLAN_KEY], source)
