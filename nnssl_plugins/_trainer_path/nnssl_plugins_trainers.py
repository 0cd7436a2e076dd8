"""Discovery shim for stock `nnUNetv2_train -tr <Name>`.

nnU-Net 2.8 imports every module in the folders listed in `nnUNet_extTrainer` as a *top-level*
module and looks for the requested class name. This folder holds only this module, so nothing
else of ours is imported twice under another name; it re-exports every trainer of the package.
"""
from nnssl_plugins.trainers import *  # noqa: F401,F403
from nnssl_plugins.errors import install_excepthook  # noqa: E402

# stock nnUNetv2_train: our trainers' user errors (bad labels file, incompatible checkpoint) print one line
install_excepthook()
