"""Setup shim: ships one .pth file so stock `nnUNetv2_train -tr <our trainer>` finds our trainers.

The .pth runs at interpreter start-up (site.py), appends our trainer-discovery folder to the
`nnUNet_extTrainer` env var that nnU-Net 2.8 searches, and imports nothing (find_spec only).
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "nnssl_plugins_trainers.pth"
PTH_LINE = (
    "import os, importlib.util as _u; "
    "exec('try:\\n s = _u.find_spec(\"nnssl_plugins\")\\n d = os.path.join(os.path.dirname(s.origin), \"_trainer_path\")'"
    "'\\n cur = [p for p in os.environ.get(\"nnUNet_extTrainer\", \"\").split(os.pathsep) if p]'"
    "'\\n cur.append(d) if d not in cur else None'"
    "'\\n os.environ[\"nnUNet_extTrainer\"] = os.pathsep.join(cur)'"
    "'\\nexcept Exception:\\n pass')\n"
)


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        target = os.path.join(self.build_lib, PTH_NAME)
        os.makedirs(self.build_lib, exist_ok=True)
        with open(target, "w") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=1):
        return list(super().get_outputs(include_bytecode)) + [os.path.join(self.build_lib, PTH_NAME)]


try:  # editable installs (pip install -e .) build the wheel through this command instead
    from setuptools.command.editable_wheel import editable_wheel

    class editable_wheel_with_pth(editable_wheel):
        def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
            result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
            with open(os.path.join(unpacked_wheel, PTH_NAME), "w") as f:
                f.write(PTH_LINE)
            return result

    cmdclass = {"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth}
except ImportError:  # very old setuptools: no PEP 660 editable installs at all
    cmdclass = {"build_py": build_py_with_pth}

setup(cmdclass=cmdclass)
