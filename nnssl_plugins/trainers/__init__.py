"""Every nnU-Net trainer class of the package (stock `nnUNetv2_train -tr <Name>` finds them here)."""
from nnssl_plugins.trainers.pretrain_base import nnsslPretrainTrainer  # noqa: F401
from nnssl_plugins.trainers.mdae import (  # noqa: F401
    MDAEPretrainTrainer, MDAEPretrainTrainer_smoke, MDAEPretrainTrainer_flow, MDAEPretrainTrainer_fixedMask50,
    MDAEPretrainTrainer_flow_smoke,
)
from nnssl_plugins.trainers.stock_variants import nnUNetTrainer_nnsslSmoke  # noqa: F401
from nnssl_plugins.trainers.finetune import (  # noqa: F401
    nnsslFinetuneTrainer, nnsslFinetuneTrainer_full, nnsslFinetuneTrainer_frozenEncoder, nnsslFinetuneTrainer_150ep,
    nnsslPrimusFinetuneTrainer, nnsslPrimusFinetuneTrainer_full, nnsslPrimusFinetuneTrainer_frozenEncoder,
    nnsslPrimusFinetuneTrainer_150ep, nnsslFinetuneTrainer_smoke, nnsslPrimusFinetuneTrainer_smoke,
)
from nnssl_plugins.trainers.classification import (  # noqa: F401
    nnsslClsTrainer, nnsslClsTrainer_Frozen, nnsslClsTrainer_balanced, nnsslClsTrainer_Frozen_balanced,
    nnsslClsTrainer_Frozen_smoke,
)
from nnssl_plugins.trainers.hiend_mae import HiEndMAEPretrainTrainer, HiEndMAEPretrainTrainer_smoke  # noqa: F401
from nnssl_plugins.trainers.maesil import MAESILPretrainTrainer, MAESILPretrainTrainer_smoke  # noqa: F401
from nnssl_plugins.trainers.mass import (  # noqa: F401
    MASSPretrainTrainer, MASSPretrainTrainer_smoke, MASSPretrainTrainer_onecycle, MASSPretrainTrainer_ema,
    MASSPretrainTrainer_ema_smoke,
)
