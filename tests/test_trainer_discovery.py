"""Every trainer class written in nnssl_plugins/trainers/ is exported by the package and found by nnU-Net's own
trainer search (what stock `nnUNetv2_train -tr <Name>` uses) — with no hand-kept list to forget."""
from __future__ import annotations

import ast
import importlib
import os

TRAINERS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nnssl_plugins", "trainers")


def classes_in_source():
    """(module, class name) of every top-level class statement in trainers/*.py, read from the source."""
    out = []
    for f in sorted(os.listdir(TRAINERS_DIR)):
        if f.endswith(".py") and f != "__init__.py":
            tree = ast.parse(open(os.path.join(TRAINERS_DIR, f), encoding="utf-8").read())
            out += [(f"nnssl_plugins.trainers.{f[:-3]}", n.name) for n in tree.body if isinstance(n, ast.ClassDef)]
    return out


def test_every_trainer_class_is_exported_and_found_by_nnunet():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    import nnssl_plugins.trainers as package
    from nnssl_plugins.cli.trainer_path import ensure_trainer_discovery

    trainers = {}
    for module, name in classes_in_source():
        obj = getattr(importlib.import_module(module), name)
        if issubclass(obj, nnUNetTrainer):
            trainers[name] = obj
    assert {"MASSPretrainTrainer", "MDAEPretrainTrainer_smoke", "nnsslClsTrainer_Frozen",
            "nnUNetTrainer_nnsslSmoke"} <= set(trainers)
    assert sorted(trainers) == package.__all__
    ensure_trainer_discovery()
    for name, cls in trainers.items():
        assert recursive_find_trainer_class_by_name(name) is cls, name
