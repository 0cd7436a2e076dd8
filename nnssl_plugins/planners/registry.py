"""Method name → planner class, found by scanning this package (a new method = one new module)."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Dict, Type

from nnssl_plugins.errors import UserInputError


def planners() -> Dict[str, Type]:
    import nnssl_plugins.planners as pkg
    from nnssl_plugins.planners.base import nnsslPlanner

    found = {}
    for m in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{m.name}")
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, nnsslPlanner) and obj.method:
                found[obj.method] = obj
    return found


def get_planner(method: str):
    table = planners()
    for name, cls in table.items():
        if name.lower() == str(method).lower():
            return cls
    raise UserInputError(f"-m {method}: unknown method. Choose one of {sorted(table)}.")
