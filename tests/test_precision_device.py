"""One precision rule (utils/precision.py) and "cuda if available" device defaults of the inference CLIs
(nnssl_incontext_predict, nnssl_generate_masks). CUDA is simulated: no GPU on the test machines."""
import pytest
import torch

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.utils import precision


def _fake_gpu(monkeypatch, cc):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cc is not None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)


def test_autocast_dtype_rule(monkeypatch):
    assert precision.autocast_dtype("cpu") is None
    with precision.autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")
    _fake_gpu(monkeypatch, (9, 0))
    assert precision.autocast_dtype("cuda") == torch.bfloat16
    assert precision.autocast_dtype(torch.device("cuda", 0), allow_fp16=False) == torch.bfloat16
    assert precision.autocast_dtype("cpu") is None
    _fake_gpu(monkeypatch, (7, 5))  # emulated bf16 only: never chosen below 8.0
    assert precision.autocast_dtype("cuda") == torch.float16
    assert precision.autocast_dtype("cuda", allow_fp16=False) is None
    assert not precision.native_bf16("cuda")


def test_tf32_only_on_cards_with_it_and_restored(monkeypatch):
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    _fake_gpu(monkeypatch, (7, 5))
    with precision.tf32("cuda"):
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    _fake_gpu(monkeypatch, (8, 0))
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with precision.tf32("cuda"):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 is False
        with precision.tf32("cpu"):
            assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


class _Stop(Exception):
    pass


@pytest.mark.parametrize("gpu", [True, False])
def test_generate_masks_device_default(monkeypatch, gpu):
    import nnssl_plugins.pretrain.masks.generate as gen
    from nnssl_plugins.cli import generate_masks

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    seen = {}

    def fake(dataset, **kw):
        seen.update(kw["backend_options"])
        raise _Stop

    monkeypatch.setattr(gen, "generate_dataset", fake)
    with pytest.raises(_Stop):
        generate_masks.main(["-d", "1", "--backend", "sam2"])
    assert seen["device"] == ("cuda" if gpu else "cpu")
    if not gpu:
        with pytest.raises(UserInputError, match="-device cuda: no CUDA GPU visible"):
            generate_masks.main(["-d", "1", "--backend", "sam2", "-device", "cuda"])


@pytest.mark.parametrize("gpu", [True, False])
def test_incontext_predict_device_default(monkeypatch, tmp_path, gpu):
    from nnssl_plugins.cli import incontext_predict

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    ck = tmp_path / "checkpoint_final.pth"
    ck.write_bytes(b"x")
    seen = {}

    def fake(path, device="cpu"):
        seen["device"] = device
        raise _Stop

    monkeypatch.setattr(incontext_predict, "load_mass_checkpoint", fake)
    with pytest.raises(_Stop):
        incontext_predict.main(["-ckpt", str(ck), "-i", "x.nii.gz", "-o", "y.nii.gz"])
    assert seen["device"] == torch.device("cuda" if gpu else "cpu")
    if not gpu:
        with pytest.raises(UserInputError, match="-device cuda:1: no CUDA GPU visible"):
            incontext_predict.main(["-ckpt", str(ck), "-i", "x.nii.gz", "-o", "y.nii.gz", "-device", "cuda:1"])


def test_predict_volume_runs_under_the_shared_autocast(monkeypatch):
    """predict_volume enters precision.autocast(device) around the network (fp32 no-op on CPU)."""
    import contextlib

    import nnssl_plugins.pretrain.mass.inference as inf

    entered = []

    @contextlib.contextmanager
    def rec(device, allow_fp16=True):
        entered.append(torch.device(device))
        yield

    monkeypatch.setattr(inf, "autocast", rec)

    class Emb:
        batch_size, num_classes = 1, 2

        def to(self, device):
            return self

    class Model(torch.nn.Module):
        input_channels = 1

        def segment(self, x, emb):
            return torch.zeros((x.shape[0], 2) + tuple(x.shape[2:]))

    p = inf.predict_volume(Model(), torch.zeros(1, 8, 8, 8), Emb(), (8, 8, 8), device="cpu")
    assert entered == [torch.device("cpu")] and p.shape == (2, 8, 8, 8) and p.dtype == torch.float32
