"""MASS model: shapes, key transfer to stock nnU-Net, tiny overfit on real CT, embeddings, inference."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.mass import (
    TaskEmbedding,
    average_embeddings,
    build_backbone,
    build_mass_model,
    decoder_features,
    hard_dice,
    mass_arch_kwargs,
    mass_loss,
    pca_rgb,
    predict_volume,
)

from conftest import REAL_CT as CT, REAL_CT_SEG as CT_SEG
PATCH = (32, 32, 32)


def tiny_kwargs():
    # 4 stages (strides 1,2,4,8), 8-16-32-64 features, 1 block per stage: task stages 1,2,3 (strides 2,4,8)
    return mass_arch_kwargs(n_stages=4, base_features=8, max_features=64, n_blocks_per_stage=1)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_mass_model(tiny_kwargs(), input_channels=1, patch_size=PATCH)


def test_shapes_and_stage_mapping(tiny_model):
    m = tiny_model
    assert m.task_stages == [1, 2, 3]
    assert m.task_strides == [(2, 2, 2), (4, 4, 4), (8, 8, 8)]
    ref = torch.randn(2, 1, *PATCH)
    masks = (torch.rand(2, 3, *PATCH) > 0.7).float()
    q = torch.randn(2, 1, *PATCH)
    emb = m.encode_task(ref, masks)
    assert [tuple(t.shape) for t in emb.tokens] == [(2, 3, 11, 16), (2, 3, 11, 32), (2, 3, 11, 64)]
    logits = m.segment(q, emb)
    assert logits.shape == (2, 3, *PATCH)
    # forward == encode_task + segment (shared encoder pass is exact: InstanceNorm is per sample)
    m.eval()
    with torch.no_grad():
        a = m(ref, masks, q)
        b = m.segment(q, m.encode_task(ref, masks))
    m.train()
    assert torch.allclose(a, b, atol=1e-4)
    loss, d = mass_loss(logits, masks)
    loss.backward()
    assert set(d) >= {"loss", "dice_loss", "bce", "soft_dice"} and np.isfinite(d["loss"])
    # every method part receives gradient
    assert m.task_encoder[0].query_tokens.grad is not None
    assert m.query_decoder[0][0].t2i.q.weight.grad is not None
    m.zero_grad(set_to_none=True)


def test_three_stage_mapping():
    m = build_mass_model(mass_arch_kwargs(3, 8, 32, 1), 1, patch_size=(16, 16, 16))
    assert m.task_strides == [(2, 2, 2), (4, 4, 4)]
    x = torch.randn(1, 1, 16, 16, 16)
    assert m(x, (x > 0).float().repeat(1, 2, 1, 1, 1), x).shape == (1, 2, 16, 16, 16)


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_keys_transfer_to_stock_resenc_unet(tiny_model, tmp_path, deep_supervision):
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    from nnssl_plugins.pretrain.mass.arch import resolve_arch_kwargs

    sd = tiny_model.state_dict()
    for in_ch, k in [(1, 5), (1, 2)]:
        net = ResidualEncoderUNet(in_ch, num_classes=k, deep_supervision=deep_supervision,
                                  **resolve_arch_kwargs(tiny_kwargs()))
        for key, v in net.state_dict().items():
            if ".seg_layers." in key:
                continue
            assert key in sd, key
            assert sd[key].shape == v.shape, key
        ckpt = tmp_path / "mass.pth"
        torch.save({"network_weights": sd}, ckpt)
        load_pretrained_weights(net, str(ckpt))
        assert torch.equal(net.state_dict()["encoder.stem.convs.0.conv.weight"], sd["encoder.stem.convs.0.conv.weight"])
    # method-only parts live in extra submodules
    extra = {k.split(".")[0] for k in sd if not k.startswith(("encoder.", "decoder."))}
    assert extra == {"task_encoder", "query_decoder", "head", "head_bias"}
    # plans-format kwargs (strings) build the same backbone
    assert isinstance(build_backbone(tiny_kwargs(), 1), ResidualEncoderUNet)


def test_embedding_average_and_save_load(tiny_model, tmp_path):
    m = tiny_model.eval()
    ref = torch.randn(1, 1, *PATCH)
    masks = (torch.rand(1, 2, *PATCH) > 0.6).float()
    with torch.no_grad():
        e = m.encode_task(ref, masks)
        e2 = m.encode_task(ref.repeat(3, 1, 1, 1, 1), masks.repeat(3, 1, 1, 1, 1))
    avg = average_embeddings([e, e, e])
    assert avg.num_references == 3
    for a, b in zip(avg.tokens, e.tokens):
        assert torch.allclose(a, b, atol=1e-6)
    for a, b in zip(e2.mean_over_batch().tokens, e.tokens):
        assert torch.allclose(a, b, atol=1e-5)
    p = str(tmp_path / "task.safetensors")
    avg.save(p)
    back = TaskEmbedding.load(p)
    assert back.strides == avg.strides and back.num_references == 3
    for a, b in zip(back.tokens, avg.tokens):
        assert torch.equal(a, b)
    q = torch.randn(1, 1, *PATCH)
    with torch.no_grad():
        assert torch.allclose(m.segment(q, back), m.segment(q, e), atol=1e-4)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a file")
    with pytest.raises(UserInputError, match="bad.safetensors"):
        TaskEmbedding.load(str(bad))
    with pytest.raises(UserInputError):
        average_embeddings([e, m.encode_task(ref, masks[:, :1])])
    m.train()


def test_channel_mismatch_raises(tiny_model):
    ref = torch.randn(1, 1, *PATCH)
    masks = (torch.rand(1, 2, *PATCH) > 0.5).float()
    q2 = torch.randn(1, 2, *PATCH)
    with pytest.raises(UserInputError, match="channel"):
        tiny_model(ref, masks, q2)
    with torch.no_grad():
        emb = tiny_model.encode_task(ref, masks)
    with pytest.raises(UserInputError, match="channel"):
        tiny_model.segment(q2, emb)
    with pytest.raises(UserInputError, match="channel"):
        predict_volume(tiny_model, torch.randn(2, 40, 40, 40), emb, PATCH)
    with pytest.raises(UserInputError, match="reference masks"):
        tiny_model.encode_task(ref, masks[..., :16])
    with pytest.raises(UserInputError, match="divisible"):
        tiny_model.segment(torch.randn(1, 1, 30, 32, 32), emb)


def test_masked_mean_and_encode_task_under_inference_mode(tiny_model):
    """The masked mean of upsampled features is plain tensor ops (no autograd): exact vs materialised
    trilinear upsampling, and encode_task works under torch.inference_mode (same result as no_grad)."""
    import torch.nn.functional as F

    from nnssl_plugins.pretrain.mass.model import masked_mean_of_upsampled

    torch.manual_seed(2)
    for fs, ms in (((2, 5, 4, 4, 4), (2, 3, 32, 32, 32)), ((1, 3, 3, 5, 7), (1, 2, 24, 40, 21)),
                   ((1, 4, 8, 8, 8), (1, 2, 8, 8, 8)), ((1, 4, 1, 2, 3), (1, 2, 16, 16, 16))):
        f, m = torch.randn(*fs), (torch.rand(*ms) > 0.5).float()
        up = F.interpolate(f.double(), size=ms[2:], mode="trilinear", align_corners=False)
        want = torch.einsum("bkxyz,bcxyz->bkc", m.double(), up) / m.double().flatten(2).sum(-1).unsqueeze(-1)
        with torch.inference_mode():
            got = masked_mean_of_upsampled(f, m)
        assert torch.allclose(got.double(), want, atol=1e-5), (fs, ms)
    m = tiny_model.eval()
    ref, masks = torch.randn(1, 1, *PATCH), (torch.rand(1, 2, *PATCH) > 0.6).float()
    with torch.no_grad():
        e0 = m.encode_task(ref, masks)
    with torch.inference_mode():
        e1 = m.encode_task(ref, masks)
        q = m.segment(torch.randn(1, 1, *PATCH), e1)
    assert q.shape == (1, 2, *PATCH)
    for a, b in zip(e0.tokens, e1.tokens):
        assert torch.equal(a, b)
    m.train()


def test_sliding_window_and_features(tiny_model):
    torch.manual_seed(1)
    ref = torch.randn(1, 1, *PATCH)
    masks = (torch.rand(1, 3, *PATCH) > 0.5).float()
    with torch.no_grad():
        emb = tiny_model.encode_task(ref, masks)
    vol = torch.randn(1, 45, 38, 50)
    probs = predict_volume(tiny_model, vol, emb, PATCH, overlap=0.5)
    assert probs.shape == (3, 45, 38, 50)
    assert float(probs.min()) >= 0 and float(probs.max()) <= 1 and torch.isfinite(probs).all()
    small = predict_volume(tiny_model, torch.randn(1, 20, 33, 32), emb, PATCH)  # smaller than patch -> padded
    assert small.shape == (3, 20, 33, 32)
    assert tiny_model.training  # restored
    feats = decoder_features(tiny_model, torch.randn(1, 20, 33, 27))
    assert feats.shape == (8, 20, 33, 27)
    rgb = pca_rgb(feats)
    assert rgb.shape == (20, 33, 27, 3) and rgb.dtype == np.uint8 and rgb.max() > rgb.min()


def _ct_crop():
    import nibabel as nib
    img = np.asanyarray(nib.load(CT).dataobj).astype(np.float32)
    seg = np.asanyarray(nib.load(CT_SEG).dataobj)
    sl = (slice(40, 72), slice(30, 62), slice(0, 30))
    img, seg = img[sl], seg[sl]
    img = np.clip(img, -991, 500)
    img = (img - img.mean()) / (img.std() + 1e-8)
    pad = [(0, 0), (0, 0), (0, 32 - img.shape[2])]
    img, seg = np.pad(img, pad), np.pad(seg, pad)
    # kidney_left, liver, stomach, lung_lower_lobe_right, small_bowel: all > 300 voxels in this crop.
    # Several masks matter: with only 2 masks the net can sit in a "predict the union" minimum for a while;
    # with several, the union is a bad answer and the task embedding must tell the classes apart.
    labels = [3, 5, 6, 14, 18]
    masks = np.stack([seg == lab for lab in labels]).astype(np.float32)
    assert masks.reshape(len(labels), -1).sum(1).min() > 300
    return torch.from_numpy(img)[None, None], torch.from_numpy(masks)[None]


def test_tiny_overfit_real_ct():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    img, masks = _ct_crop()
    m = build_mass_model(tiny_kwargs(), 1, patch_size=PATCH)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=1e-5)
    with torch.no_grad():
        d0 = hard_dice(m(img, masks, img), masks).mean().item()
    for _ in range(50):  # ~25 s on one idle CPU core
        loss, _ = mass_loss(m(img, masks, img), masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
    m.eval()
    with torch.no_grad():
        logits = m(img, masks, img)
    per_class = hard_dice(logits, masks)[0]
    d1 = per_class.mean().item()
    assert d1 > max(0.6, d0 + 0.3), (d0, per_class.tolist())
    # the classes are told apart (not one shared union prediction)
    assert (per_class > 0.5).sum() >= 3, per_class.tolist()
