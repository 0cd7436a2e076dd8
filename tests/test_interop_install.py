"""Installing into an existing environment: ranges in pyproject.toml, exact sets in constraints files, sam2 optional."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO


def _pins(name: str) -> dict:
    from packaging.utils import canonicalize_name

    pins = {}
    with open(os.path.join(REPO, name)) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                pkg, version = line.split("==")
                pins[canonicalize_name(pkg)] = version
    return pins


def test_ranges_contain_the_ci_set_and_lower_bounds_are_the_tested_ones():
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    deps = [Requirement(d) for d in project["dependencies"]]
    extras = {k: [Requirement(d) for d in v] for k, v in project["optional-dependencies"].items()}
    ci, lowest = _pins("constraints.txt"), _pins("constraints-lowest.txt")
    names = {canonicalize_name(r.name) for r in deps}
    assert "sam2" not in names and [r.name for r in extras["sam2"]] == ["sam2"]
    assert {"pytest", "loguru"} <= {r.name for r in extras["test"]}
    for r in deps + extras["sam2"] + extras["test"]:
        name = canonicalize_name(r.name)
        assert all(s.operator != "==" for s in r.specifier), f"{r}: declare a range, pin in constraints.txt"
        assert name in ci and r.specifier.contains(ci[name]), (str(r), ci.get(name))
        for s in r.specifier:
            if s.operator == ">=":  # every declared lower bound is the version constraints-lowest.txt tests
                assert name in lowest and Version(lowest[name]) == Version(s.version), (str(r), lowest.get(name))
    for name in ("torch", "nnunetv2", "dynamic-network-architectures", "batchgeneratorsv2", "numpy"):
        assert any(s.operator == ">=" for r in deps if canonicalize_name(r.name) == name for s in r.specifier), name
    ci_script = open(os.path.join(REPO, ".ci", "run")).read()
    assert 'cat pyproject.toml setup.py .ci/run "$CONSTRAINTS" | sha256sum' in ci_script  # venv cache key
    assert ci_script.count('-c "$CONSTRAINTS"') == 3 and '-e ".[test,sam2]"' in ci_script
    assert "--no-build-isolation" in ci_script and '[ "$rc" -eq 5 ]' in ci_script


def test_sam2_backend_without_sam2_says_how_to_install(monkeypatch):
    from nnssl_plugins.errors import UserInputError
    from nnssl_plugins.pretrain.masks.backends import make_backend

    monkeypatch.setitem(sys.modules, "sam2", None)  # as if the sam2 extra were not installed
    with pytest.raises(UserInputError) as e:
        make_backend("sam2", checkpoint="sam2.pt", config="configs/sam2.1/sam2.1_hiera_l.yaml", device="cpu")
    msg = str(e.value)
    assert msg.startswith("--backend sam2:") and "nnssl_plugins[sam2]" in msg
    assert "SAM2_BUILD_CUDA=0 pip install --no-build-isolation 'sam2>=1.1.0'" in msg


def test_package_imports_without_sam2():
    """Every module of the package imports when sam2 is absent (it is an extra)."""
    code = ("import sys, pkgutil, importlib\n"
            "sys.modules['sam2'] = None\n"
            "import nnssl_plugins\n"
            "mods = [m.name for m in pkgutil.walk_packages(nnssl_plugins.__path__, 'nnssl_plugins.')]\n"
            "for m in mods: importlib.import_module(m)\n"
            "assert sys.modules['sam2'] is None\n"
            "print(len(mods))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.strip().splitlines()[-1]) > 50
