"""Imports run one way (issue 11), counting every import statement, also those inside functions:

    cli → trainers → planners → pretrain → (errors, utils)

* a layer imports only its own layer and the layers to its right;
* `pretrain/common` imports nothing else of `pretrain/`;
* a method (a package of `pretrain/` other than the shared `common`, `mae_common`, `masks`, and the modules
  `trainers/<method>.py`, `planners/<method>.py`) imports no other method, and shared code outside `cli/`
  imports no method at all (`cli/` commands may be method-specific).

The source is parsed with `ast` (nothing is imported), so a wrong edge hidden in a function body counts too.
"""
from __future__ import annotations

import ast
import os
from typing import Iterator, List, Optional, Tuple

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nnssl_plugins")
PKG = "nnssl_plugins"
LAYERS = {"_trainer_path": 4, "cli": 4, "trainers": 3, "planners": 2, "pretrain": 1, "errors": 0, "utils": 0}
SHARED_PRETRAIN = {"common", "mae_common", "masks"}
METHODS = sorted(d for d in os.listdir(os.path.join(ROOT, "pretrain"))
                 if os.path.isfile(os.path.join(ROOT, "pretrain", d, "__init__.py")) and d not in SHARED_PRETRAIN)


def module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def is_package(path: str) -> bool:
    return os.path.basename(path) == "__init__.py"


def python_files() -> List[str]:
    out = []
    for d, _, files in os.walk(ROOT):
        out += [os.path.join(d, f) for f in files if f.endswith(".py")]
    return sorted(out)


def _exists(mod: str) -> bool:
    p = os.path.join(os.path.dirname(ROOT), *mod.split("."))
    return os.path.isfile(p + ".py") or os.path.isfile(os.path.join(p, "__init__.py"))


def imported_modules(source: str, me: str, package: bool) -> Iterator[Tuple[int, str]]:
    """(line, module) of every nnssl_plugins module that the source of module `me` imports, at any depth of the
    syntax tree. `from pkg import sub` counts as importing the submodule when `sub` is one."""
    tree = ast.parse(source)
    base_pkg = me if package else me.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == PKG or a.name.startswith(PKG + "."):
                    yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base_pkg.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == PKG or target.startswith(PKG + ".")):
                continue
            subs = [f"{target}.{a.name}" for a in node.names if _exists(f"{target}.{a.name}")]
            for t in subs or [target]:
                yield node.lineno, t


def layer(mod: str) -> Optional[str]:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else None


def method_of(mod: str) -> Optional[str]:
    """The method a module belongs to (pretrain/<m>/..., trainers/<m>.py, planners/<m>.py), else None."""
    parts = mod.split(".")
    if len(parts) >= 3 and parts[1] in ("pretrain", "trainers", "planners") and parts[2] in METHODS:
        return parts[2]
    return None


def violations(path: str, source: Optional[str] = None) -> List[str]:
    """Wrong-direction imports of the module at `path` (its text, or `source` in its place)."""
    me = module_name(path)
    my_layer = layer(me)
    source = open(path, encoding="utf-8").read() if source is None else source
    out = []
    for line, target in imported_modules(source, me, is_package(path)):
        t_layer = layer(target)
        where = f"{os.path.relpath(path, os.path.dirname(ROOT))}:{line} imports {target}"
        if my_layer in LAYERS and t_layer in LAYERS and LAYERS[t_layer] > LAYERS[my_layer]:
            out.append(f"{where}: {my_layer} may not import {t_layer} (cli → trainers → planners → pretrain)")
        if me.startswith(f"{PKG}.pretrain.common") and target.startswith(f"{PKG}.pretrain.") and \
                not target.startswith(f"{PKG}.pretrain.common"):
            out.append(f"{where}: pretrain/common knows no method")
        if my_layer not in ("cli", "_trainer_path"):
            mine, theirs = method_of(me), method_of(target)
            if theirs is not None and theirs != mine:
                who = f"method {mine}" if mine else "shared code"
                out.append(f"{where}: {who} may not import method {theirs}")
    return out


def test_methods_found():
    assert {"mdae", "mass", "hiend_mae", "maesil"} <= set(METHODS)


def test_import_direction():
    found = [v for f in python_files() for v in violations(f)]
    assert not found, "wrong-direction imports:\n" + "\n".join(found)


@pytest.mark.parametrize("importer, line, why", [
    ("pretrain/mass/arch.py", "from nnssl_plugins.planners.base import nnsslPlanner", "pretrain may not import planners"),
    ("pretrain/common/classification.py", "    from nnssl_plugins.trainers.finetune import nnsslFinetuneTrainer",
     "pretrain may not import trainers"),
    ("pretrain/common/data.py", "from nnssl_plugins.pretrain.mae_common import loss", "pretrain/common knows no method"),
    ("pretrain/maesil/model.py", "from ..hiend_mae.model import HiEndMAE", "method maesil may not import method hiend_mae"),
    ("trainers/maesil.py", "from nnssl_plugins.trainers import hiend_mae", "method maesil may not import method hiend_mae"),
    ("trainers/finetune.py", "import nnssl_plugins.pretrain.mass.model", "shared code may not import method mass"),
    ("planners/base.py", "from nnssl_plugins.cli.training import find_trainer", "planners may not import cli"),
])
def test_checker_catches_wrong_edges(importer, line, why):
    """The checker itself: a real module with one bad import appended (inside a function when the line is
    indented) is reported, and the module as it is is not."""
    path = os.path.join(ROOT, *importer.split("/"))
    src = open(path, encoding="utf-8").read()
    assert violations(path, src) == []
    body = f"\n\ndef _bad():\n{line}\n" if line.startswith(" ") else f"\n{line}\n"
    found = violations(path, src + body)
    assert len(found) == 1 and why in found[0], found
