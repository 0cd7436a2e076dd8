"""Every nnU-Net trainer class of the package, found by walking this package: each module here is imported and
each `nnUNetTrainer` subclass it defines is exported (a new trainer module needs no edit anywhere else).
Stock `nnUNetv2_train -tr <Name>` finds them through `nnssl_plugins/_trainer_path/`."""
import importlib
import inspect
import pkgutil

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def _discover() -> dict:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, nnUNetTrainer) and obj.__module__ == module.__name__:
                found[name] = obj
    return found


TRAINERS = _discover()
globals().update(TRAINERS)
__all__ = sorted(TRAINERS)
