"""plan_and_preprocess(): fingerprint → method plans → nnU-Net preprocessing, for labeled or unlabeled data."""
from __future__ import annotations

from typing import Optional, Sequence

from nnssl_plugins.planners import preprocessing as U
from nnssl_plugins.planners.registry import get_planner


def plan_and_preprocess(dataset, method: str, preset: str = "default", num_processes: int = 1,
                        plans_name: Optional[str] = None, patch_size: Optional[Sequence[int]] = None,
                        spacing: Optional[Sequence[float]] = None, batch_size: Optional[int] = None,
                        arch_overrides: Optional[dict] = None, overwrite: bool = False,
                        preprocess: bool = True) -> str:
    """Returns the plans name. Reruns reuse the fingerprint and skip finished cases."""
    U.require_env()
    planner_cls = get_planner(method)
    name = U.dataset_name_from_id(dataset)
    dataset_json = U.load_raw_dataset_json(name)
    cases = U.list_cases(name, dataset_json)
    labeled = U.is_labeled(cases)
    if not labeled:
        n_lab = sum(c["label"] is not None for c in cases.values())
        if n_lab:
            print(f"NOTE: only {n_lab}/{len(cases)} cases have labels; preprocessing images only.")
        for c in cases.values():
            c["label"] = None
    print(f"{name}: {len(cases)} case(s), {'labeled' if labeled else 'unlabeled'}, method {planner_cls.method}, "
          f"preset {preset}")
    U.extract_fingerprint(name, cases, dataset_json, num_processes=num_processes, overwrite=overwrite)
    planner = planner_cls(name, preset=preset, plans_name=plans_name, patch_size=patch_size, spacing=spacing,
                          batch_size=batch_size, arch_overrides=arch_overrides)
    planner.plan_experiment()
    dj = U.write_preprocessed_dataset_json(name, dataset_json)
    if preprocess:
        out = U.preprocess(name, planner.plans_identifier, cases, dj, "3d_fullres", num_processes, overwrite)
        print(f"Preprocessed data: {out}")
    return planner.plans_identifier
