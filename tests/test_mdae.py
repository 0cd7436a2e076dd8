"""MDAE: corruption statistics, loss weighting, superset/FiLM identity, tiny overfit on real CT."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnssl_plugins.pretrain.common.networks import resenc_architecture
from nnssl_plugins.pretrain.mdae.corruption import block_mask, corrupt
from nnssl_plugins.pretrain.mdae.loss import mdae_loss, visible_weight
from nnssl_plugins.pretrain.mdae.model import MDAENetwork

from conftest import REAL_CT

ARCH = resenc_architecture([8, 16, 32], [1, 1, 1])


def backbone(in_ch=1, out_ch=1, ds=False):
    return get_network_from_plans(ARCH["network_class_name"], ARCH["arch_kwargs"], ARCH["_kw_requires_import"],
                                  in_ch, out_ch, allow_init=True, deep_supervision=ds)


def test_block_mask_is_blocky_and_matches_ratio():
    g = torch.Generator().manual_seed(0)
    ratio = torch.tensor([[0.25, 0.75]])
    vis = block_mask((1, 2, 64, 64, 48), 16, ratio.expand(1, 2), generator=g)
    assert vis.shape == (1, 2, 64, 64, 48)
    # every 16³ block is constant
    blocks = vis[0, 0].reshape(4, 16, 4, 16, 3, 16).permute(0, 2, 4, 1, 3, 5).reshape(48, -1).float()
    assert torch.all((blocks.mean(1) == 0) | (blocks.mean(1) == 1))
    # masked fraction over many draws ≈ ratio, independently per channel
    fr = []
    for _ in range(200):
        v = block_mask((1, 2, 64, 64, 64), 16, ratio, generator=g)
        fr.append(1 - v.float().mean((0, 2, 3, 4)))
    fr = torch.stack(fr).mean(0)
    assert abs(fr[0] - 0.25) < 0.03 and abs(fr[1] - 0.75) < 0.03


def test_variable_ratio_range_and_ve_noise():
    g = torch.Generator().manual_seed(1)
    x0 = torch.zeros(64, 1, 32, 32, 32)
    c = corrupt(x0, "ve", sigma_max=5.0, block=16, generator=g)
    masked_frac = 1 - c.visible.float().mean((1, 2, 3, 4))
    assert masked_frac.min() >= 0 and masked_frac.max() <= 1
    assert torch.allclose(c.sigma, c.t * 5.0)
    # visible voxels carry x0 + σ z, masked ones are exactly zero
    assert torch.all(c.x_in[~c.visible] == 0)
    std = torch.stack([c.x_in[i][c.visible[i]].std() for i in range(64) if c.visible[i].sum() > 1000])
    sig = torch.stack([c.sigma[i] for i in range(64) if c.visible[i].sum() > 1000])
    assert torch.allclose(std, sig, rtol=0.1, atol=0.05)
    f = corrupt(torch.ones(4, 1, 16, 16, 16), "flow", mask_ratio=0.0, generator=g)
    assert f.visible.all()
    with pytest.raises(ValueError):
        corrupt(x0[:1], "nope")


def test_loss_weighting_makes_ideal_denoiser_unit_at_every_sigma():
    # for unit-variance Gaussian x0, the MMSE estimate x0_hat = x_t / (1 + σ²) has MSE σ²/(1+σ²); w·MSE ≈ 1
    torch.manual_seed(0)
    for s in (0.3, 1.0, 3.0):
        x0 = torch.randn(1, 1, 32, 32, 32)
        xt = x0 + s * torch.randn_like(x0)
        mse = ((xt / (1 + s * s) - x0) ** 2).mean()
        assert abs(float(visible_weight(torch.tensor([s])) * mse) - 1) < 0.1
    assert float(visible_weight(torch.tensor([1e-6]))) == 100.0  # capped


def test_network_is_superset_and_film_starts_as_identity():
    torch.manual_seed(0)
    net = MDAENetwork(backbone())
    plain = backbone()
    stock_keys = {k: v.shape for k, v in backbone(ds=True).state_dict().items() if ".seg_layers." not in k}
    mine = {k: v.shape for k, v in net.state_dict().items()}
    assert all(k in mine and mine[k] == s for k, s in stock_keys.items())
    # zero-initialised FiLM: the time-conditioned net computes exactly the plain U-Net at init
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if k in plain.state_dict()})
    x = torch.randn(2, 1, 32, 32, 32)
    net.eval(), plain.eval()
    with torch.no_grad():
        assert torch.allclose(net(x, torch.tensor([0.1, 0.9])), plain(x), atol=1e-5)


def _real_ct_crop(size=32):
    import SimpleITK as sitk

    a = sitk.GetArrayFromImage(sitk.ReadImage(REAL_CT)).astype(np.float32)  # (30, 101, 122)
    a = np.clip(a, -200, 300)
    a = (a - a.mean()) / a.std()
    z0, y0, x0 = (np.array(a.shape) - size) // 2
    z0 = max(z0, 0)
    crop = a[z0:z0 + size, y0:y0 + size, x0:x0 + size]
    pad = [(0, size - s) for s in crop.shape]
    return torch.from_numpy(np.pad(crop, pad))[None, None]


def test_tiny_overfit_on_real_ct_lowers_loss():
    torch.manual_seed(0)
    x0 = _real_ct_crop().repeat(2, 1, 1, 1, 1)
    net = MDAENetwork(backbone())
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)

    def eval_loss():
        gg = torch.Generator().manual_seed(123)
        with torch.no_grad():
            ls = []
            for _ in range(4):
                c = corrupt(x0, "ve", generator=gg)
                ls.append(float(mdae_loss(net(c.x_in, c.t), x0, c)[0]))
        return np.mean(ls)

    before = eval_loss()
    for _ in range(40):
        c = corrupt(x0, "ve", generator=g)
        loss, logs = mdae_loss(net(c.x_in, c.t), x0, c)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)
