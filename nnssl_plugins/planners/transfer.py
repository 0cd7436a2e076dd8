"""Transfer planner: give a labeled target dataset the pretraining checkpoint's plans.

The target gets the checkpoint's architecture, spacing, patch size (the recommended downstream patch size),
normalization schemes and, for our checkpoints, the *pretraining* intensity statistics (so CT normalization is
identical to pretraining); only the dataset-specific fields (name, reader/writer, median shapes) come from the
target. The result is a plain nnU-Net plans file: stock `nnUNetv2_preprocess -plans_name` and `nnUNetv2_train -p`
use it, and stock `-pretrained_weights` then finds every key of our checkpoints with the same shape.

Checkpoints of DKFZ nnssl carry no nnU-Net plans: their first (the pretraining) configuration gives spacing,
normalization schemes and data resampling, the named architecture (ResEncL, NoSkipResEncL, PrimusS/B/M/L) is
expanded into explicit ResidualEncoderUNet / Primus kwargs, and the normalization uses the target's statistics.
Finetune them with our trainers (encoder-only loading), not stock `-pretrained_weights`.
"""
from __future__ import annotations

import os
from copy import deepcopy
from typing import Optional, Tuple

import numpy as np

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.planners import preprocessing as U
from nnssl_plugins.pretrain.common.adaptation import AdaptationPlan, get_adaptation_plan
from nnssl_plugins.utils.io import atomic_write_json, safe_torch_load


def transfer_plans(target_dataset, checkpoint_path: str, plans_name: Optional[str] = None,
                   num_processes: int = 1, allow_channel_mismatch: bool = False,
                   require_segmentation: bool = True) -> str:
    """`require_segmentation=False` (classification targets): labels/labelsTr are optional."""
    U.require_env()
    ckpt = safe_torch_load(checkpoint_path)
    plan = get_adaptation_plan(ckpt, checkpoint_path)
    name = U.dataset_name_from_id(target_dataset)
    dataset_json = U.load_raw_dataset_json(name)
    n_ch = len(U.channel_names(dataset_json))
    n_pre = plan.pretrain_num_input_channels
    if n_ch != n_pre and not allow_channel_mismatch:
        raise UserInputError(
            f"{name}: target has {n_ch} input channel(s) but {checkpoint_path} was pretrained with {n_pre}. "
            f"Stock -pretrained_weights cannot adapt the first convolution; use the finetune trainer "
            f"(-tr nnsslFinetuneTrainer, which repeats the stem kernel over channels) and run "
            f"nnssl_transfer_plans with --allow-channel-mismatch.")
    if require_segmentation and "labels" not in dataset_json:
        raise UserInputError(f"{name}/dataset.json: no 'labels' entry. Segmentation finetuning needs a labeled "
                             f"target dataset (labels + labelsTr/).")
    cases = U.list_cases(name, dataset_json)
    if require_segmentation and not U.is_labeled(cases):
        missing = [k for k, v in cases.items() if v["label"] is None][:3]
        raise UserInputError(f"{name}/labelsTr: no label for case(s) {missing}. Add labelsTr/<case>"
                             f"{dataset_json['file_ending']} for every image.")
    fp = U.extract_fingerprint(name, cases, dataset_json, num_processes=num_processes)

    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    src_plans = plan.pretrain_plan
    plans_name = plans_name or src_plans["plans_name"]
    src_cfg, intensity = _pretraining_configuration(plan, checkpoint_path)
    src_cfg["data_identifier"] = f"{plans_name}_3d_fullres"
    src_cfg["patch_size"] = list(plan.recommended_downstream_patchsize)
    if src_cfg["spacing"] is None:  # nnssl 'noresample' pretraining: keep the target's median spacing
        src_cfg["spacing"] = [float(i) for i in np.median(fp["spacings"], 0)]
    spacing = np.array(src_cfg["spacing"], dtype=float)
    new_shapes = [compute_new_shape(s, sp, spacing) for sp, s in zip(fp["spacings"], fp["shapes_after_crop"])]
    src_cfg["median_image_size_in_voxels"] = [float(i) for i in np.median(new_shapes, 0)]
    if intensity is None or n_ch != n_pre:
        # per-channel statistics from the target: a DKFZ nnssl checkpoint records none, and with channel adaption
        # by the finetune trainer the pretraining statistics cannot be split over the target's channels
        intensity = deepcopy(fp["foreground_intensity_properties_per_channel"])
    if n_ch != n_pre:
        src_cfg["normalization_schemes"] = (src_cfg["normalization_schemes"] * n_ch)[:n_ch]
        src_cfg["use_mask_for_norm"] = (src_cfg["use_mask_for_norm"] * n_ch)[:n_ch]
    first = cases[sorted(cases)[0]]["images"][0]
    plans = {
        "dataset_name": name,
        "plans_name": plans_name,
        "original_median_spacing_after_transp": [float(i) for i in np.median(fp["spacings"], 0)],
        "original_median_shape_after_transp": [int(round(i)) for i in np.median(fp["shapes_after_crop"], 0)],
        "image_reader_writer": determine_reader_writer_from_dataset_json(dataset_json, first).__name__,
        "transpose_forward": src_plans.get("transpose_forward", [0, 1, 2]),
        "transpose_backward": src_plans.get("transpose_backward", [0, 1, 2]),
        "configurations": {"3d_fullres": src_cfg},
        "experiment_planner_used": "nnssl_transfer_plans",
        "label_manager": (plan.nnunet_plans or {}).get("label_manager", "LabelManager"),
        "foreground_intensity_properties_per_channel": intensity,
        "nnssl": {"transferred_from": os.path.abspath(checkpoint_path), "source_dataset": src_plans["dataset_name"],
                  "source_plans": src_plans["plans_name"], "method": plan.method,
                  "source_architecture": plan.architecture_plans.arch_class_name,
                  "written_by": "nnssl" if plan.written_by_nnssl else "nnssl_plugins"},
    }
    out = os.path.join(os.environ["nnUNet_preprocessed"], name, plans_name + ".json")
    train = f"nnUNetv2_train {name} 3d_fullres 0 -p {plans_name}"
    if plan.written_by_nnssl:  # its pretraining network is no superset of the downstream one: encoder-only loading
        trainer = "nnsslPrimusFinetuneTrainer" if plan.backbone_class() == "Primus" else "nnsslFinetuneTrainer"
        train += f" -tr {trainer} -pretrained_weights {checkpoint_path}"
    else:
        train += " -pretrained_weights " + _adapt_output_head_for_target(
            ckpt, plans, dataset_json, checkpoint_path, os.path.join(os.path.dirname(out), plans_name))
    atomic_write_json(plans, out)
    U.write_preprocessed_dataset_json(name, dataset_json)
    print(f"Wrote {out}\nNext:\n  nnUNetv2_preprocess -d {name} -plans_name {plans_name} -c 3d_fullres\n  {train}")
    return plans_name


def _pretraining_configuration(plan: AdaptationPlan, source: str) -> Tuple[dict, Optional[dict]]:
    """(nnU-Net configuration of the pretraining, its per-channel intensity statistics or None).

    Ours: the configuration of the checkpoint's nnU-Net plans. DKFZ nnssl: built from its ConfigurationPlan
    (spacing, normalization, data resampling) + the expanded architecture; segmentation / probability resampling
    are nnU-Net's defaults (nnssl's `resampling_fn_mask` resamples an anatomy mask, not labels)."""
    if not plan.written_by_nnssl:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        cfg = deepcopy(PlansManager(plan.nnunet_plans).get_configuration(plan.pretrain_configuration).configuration)
        for key in ("inherits_from", "previous_stage", "next_stage"):
            cfg.pop(key, None)
        return cfg, deepcopy(plan.nnunet_plans["foreground_intensity_properties_per_channel"])

    import nnunetv2
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    c = plan.pretrain_configuration_plan()
    for scheme in c["normalization_schemes"]:
        if recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "preprocessing", "normalization"), scheme,
                                       "nnunetv2.preprocessing.normalization") is None:
            raise UserInputError(f"{source}: pretraining normalization '{scheme}' does not exist in nnU-Net "
                                 f"(nnunetv2.preprocessing.normalization); the target cannot be preprocessed like "
                                 f"the pretraining data.")
    # nnU-Net's default choices (these planner methods do not use the planner instance)
    _, _, r_seg, r_seg_kw = ExperimentPlanner.determine_resampling(None)
    r_prob, r_prob_kw = ExperimentPlanner.determine_segmentation_softmax_export_fn(None)
    cfg = {
        "data_identifier": None,
        "preprocessor_name": c["preprocessor_name"],
        "batch_size": 2,
        "patch_size": None,
        "median_image_size_in_voxels": None,
        "spacing": None if c["spacing"] is None else [float(s) for s in c["spacing"]],
        "normalization_schemes": list(c["normalization_schemes"]),
        "use_mask_for_norm": [bool(u) for u in c["use_mask_for_norm"]],
        "resampling_fn_data": c["resampling_fn_data"],
        "resampling_fn_data_kwargs": deepcopy(c["resampling_fn_data_kwargs"]),
        "resampling_fn_seg": r_seg.__name__,
        "resampling_fn_seg_kwargs": r_seg_kw,
        "resampling_fn_probabilities": r_prob.__name__,
        "resampling_fn_probabilities_kwargs": r_prob_kw,
        "architecture": plan.nnunet_architecture(source),
        "batch_dice": False,
    }
    return cfg, None


def _adapt_output_head_for_target(ckpt: dict, plans: dict, dataset_json: dict, checkpoint_path: str,
                                  out_prefix: str) -> str:
    """Primus keeps its decoder (`up_projection`, untrained during MAE pretraining) in the checkpoint so that
    stock `-pretrained_weights` finds every key — but that decoder's output layer has one channel per class.
    When the target's class count differs, write a copy of the checkpoint whose `up_projection` is freshly
    initialised for the target (nothing learned is lost) and return its path; otherwise the original path."""
    cfg = plans["configurations"]["3d_fullres"]
    arch = cfg["architecture"]
    weights = ckpt.get("network_weights", {})
    if not arch["network_class_name"].endswith(".Primus") or not any(k.startswith("up_projection.") for k in weights):
        return checkpoint_path
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    heads = PlansManager(plans).get_label_manager(dataset_json).num_segmentation_heads
    n_in = len(U.channel_names(dataset_json))
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], n_in,
                                 heads, allow_init=True)
    fresh = {k: v for k, v in net.state_dict().items() if k.startswith("up_projection.")}
    if all(k in weights and weights[k].shape == v.shape for k, v in fresh.items()):
        return checkpoint_path
    adapted = dict(ckpt)
    adapted["network_weights"] = {**{k: v for k, v in weights.items() if not k.startswith("up_projection.")}, **fresh}
    path = f"{out_prefix}__pretrained_weights.pth"
    from nnssl_plugins.utils.io import atomic_torch_save

    atomic_torch_save(adapted, path)
    print(f"NOTE: the checkpoint's untrained Primus decoder was built for another class count; wrote {path} with a "
          f"decoder for {heads} output channels (encoder weights unchanged). Use it with -pretrained_weights.")
    return path
