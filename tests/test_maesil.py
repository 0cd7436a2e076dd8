"""MAESIL: dual masking statistics, S-I axis helper, PSNR/SSIM, keys, visible-only encoder, overfit."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dynamic_network_architectures.architectures.primus import Primus
from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.maesil import (
    build_model, compute_loss, configure_optimizer, dual_mask, find_si_axis, get_config, psnr,
    reconstruction_metrics, ssim3d,
)

torch.set_num_threads(1)


@pytest.mark.parametrize("si_axis", [0, 1, 2])
def test_dual_mask_ratios_and_contiguity(si_axis):
    grid = (16, 16, 16)
    g = torch.Generator().manual_seed(0)
    n = 600
    m = dual_mask(n, grid, si_axis, 0.75, 0.5, g).reshape(n, *grid)
    m = torch.movedim(m, si_axis + 1, 1)  # [n, S-I, plane, plane]
    per_slice = m.reshape(n, 16, 256).sum(-1)  # masked tokens per slice perpendicular to S-I
    full = per_slice == 256
    starts = []
    for i in range(n):
        idx = torch.nonzero(full[i]).flatten()
        assert len(idx) == 8 and (idx[-1] - idx[0]).item() == 7  # one contiguous block of 50 % of the slices
        starts.append(idx[0].item())
        assert (per_slice[i][~full[i]] == 192).all()  # exactly 75 % inside every other plane
    assert (m.reshape(n, -1).sum(1) == 4096 - 8 * 64).all()  # 87.5 % overall, same for every sample
    counts = np.bincount(starts, minlength=9)
    assert len(counts) == 9 and counts.min() > 30  # every start 0..8 occurs (expected 66.7 each)
    # within non-axis-masked planes each token is masked with p = 0.75
    sel = (~full)[:, :, None, None].expand_as(m)
    # pooled over the S-I slices: ~4800 draws per in-plane position -> sd ~0.006
    freq = (m & sel).float().sum((0, 1)) / sel.float().sum((0, 1))
    assert (freq - 0.75).abs().max() < 0.04


def test_dual_mask_varies_and_validates():
    a = dual_mask(2, (4, 4, 4), 0, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a[0], a[1])
    with pytest.raises(UserInputError):
        dual_mask(1, (4, 4, 4), 3)
    with pytest.raises(UserInputError, match="different visible-token counts"):
        dual_mask(2, (3, 4, 4), [0, 1])


def _si_array_axis(img):
    """Ground truth: the array axis along which the world S coordinate changes most."""
    arr_shape = sitk.GetArrayFromImage(img).shape
    best, axis = -1, None
    for a in range(3):
        idx0, idx1 = [0, 0, 0], [0, 0, 0]
        idx1[2 - a] = 1  # array axis a = ITK index axis 2 - a
        dz = abs(img.TransformIndexToPhysicalPoint(idx1)[2] - img.TransformIndexToPhysicalPoint(idx0)[2])
        if dz > best:
            best, axis = dz, a
    return axis, arr_shape


@pytest.mark.parametrize("direction", [
    (1, 0, 0, 0, 1, 0, 0, 0, 1),  # axial
    (1, 0, 0, 0, 0, 1, 0, -1, 0),  # coronal acquisition (index y -> world -S)
    (0, 0, -1, 1, 0, 0, 0, -1, 0),  # sagittal acquisition
])
@pytest.mark.parametrize("transpose_forward", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_find_si_axis_against_simpleitk(direction, transpose_forward):
    img = sitk.Image(5, 6, 7, sitk.sitkFloat32)
    img.SetDirection(direction)
    img.SetSpacing((1.0, 2.0, 3.0))
    axis, _ = _si_array_axis(img)
    expect = list(transpose_forward).index(axis)
    assert find_si_axis(img.GetDirection(), transpose_forward) == expect
    with pytest.raises(UserInputError):
        find_si_axis((1, 0, 0, 1), transpose_forward)


def test_psnr_ssim_match_reference():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rng = np.random.default_rng(0)
    a = rng.random((20, 24, 22)).astype(np.float64)
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    assert float(ssim3d(torch.tensor(b), torch.tensor(a), 1.0)) == pytest.approx(ref, abs=1e-5)
    assert float(psnr(torch.tensor(b), torch.tensor(a), 1.0)) == pytest.approx(
        peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-4)
    assert float(ssim3d(torch.tensor(a), torch.tensor(a), 1.0)) == pytest.approx(1.0)


def test_state_dict_keys_and_visible_tokens():
    cfg = get_config("tiny")
    model = build_model(cfg, 1)
    ak = dict(cfg["arch_kwargs"], patch_embed_size=(8, 8, 8), input_shape=(32, 32, 32))
    stock = Primus(input_channels=1, num_classes=2, **ak).state_dict()
    sd = model.state_dict()
    for k, v in stock.items():
        if not k.startswith("up_projection."):
            assert k in sd and sd[k].shape == v.shape, k
    with torch.device("meta"):
        big = build_model(get_config("primus_b"), 1).state_dict()
        stock_b = Primus(1, 792, (8, 8, 8), 4, 12, 12, (128, 128, 128), drop_path_rate=0.2,
                         scale_attn_inner=True, init_values=0.1).state_dict()
    for k, v in stock_b.items():
        if not k.startswith("up_projection."):
            assert k in big and big[k].shape == v.shape, k
    assert big["eva.pos_embed"].shape == (1, 4096, 792)
    seen = []
    h = model.eva.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    loss, logs = compute_loss(model, torch.randn(2, 1, 32, 32, 32), si_axis=[0, 1])
    h.remove()
    assert seen == [8] and logs["visible_tokens"].item() == 8  # 2 of 4 slices x 4 of 16 tokens
    assert logs["mask"].float().mean().item() == 0.875


def test_tiny_overfit_improves_reconstruction():
    torch.manual_seed(0)
    x = torch.zeros(1, 1, 32, 32, 32)
    zz, yy, xx = torch.meshgrid(*[torch.linspace(-1, 1, 32)] * 3, indexing="ij")
    x[0, 0] = torch.sin(3 * zz) * torch.cos(2 * yy) + 0.5 * (xx ** 2 + yy ** 2 < 0.4).float()
    model = build_model(get_config("tiny"), 1)
    opt, sched = configure_optimizer(model, num_epochs=100, warmup_epochs=3, lr=1e-3)
    losses = []
    for step in range(100):
        sched.step(step)
        loss, logs = compute_loss(model, x, torch.Generator().manual_seed(0), si_axis=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    met = reconstruction_metrics(x, logs["reconstruction"])
    assert np.isfinite(met["psnr"]) and -1 <= met["ssim"] <= 1
