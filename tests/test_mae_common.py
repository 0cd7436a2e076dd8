"""Shared MAE machinery: visible-only encoder, masks, patchify, loss, pictures, optimizer, errors."""
import copy
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
import pytest
import torch
from einops import rearrange

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.hiend_mae import build_model, compute_loss, get_config
from nnssl_plugins.pretrain.mae_common import (
    PrimusMAEBackbone, TINY_ARCH_KWARGS, configure_optimizer, mask_to_indices, masked_mse, patchify,
    random_token_mask, save_pictures_from_logs, unpatchify, with_input_shape,
)

torch.set_num_threads(1)


def _count_tokens_entering_blocks(model):
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args, kw: seen.append(args[0].shape[1]), with_kwargs=True)
             for b in model.eva.blocks]
    return seen, hooks


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_encoder_runs_on_visible_tokens_only(ratio):
    torch.manual_seed(0)
    cfg = get_config("tiny")
    cfg["method"]["mask_ratio"] = ratio
    model = build_model(cfg, 1)
    seen, hooks = _count_tokens_entering_blocks(model)
    compute_loss(model, torch.randn(2, 1, 32, 32, 32), torch.Generator().manual_seed(1))
    for h in hooks:
        h.remove()
    n = model.num_tokens
    expect = int(n * (1 - ratio))
    assert seen == [expect] * len(model.eva.blocks)


def test_visible_path_matches_primus_eva_and_rope_is_gathered():
    """keep_idx = a permutation of ALL tokens: output must equal Primus's own eva forward, permuted.
    (Checks that abs pos-embed and the rotary table follow the gathered tokens.)"""
    torch.manual_seed(0)
    bb = PrimusMAEBackbone(TINY_ARCH_KWARGS, 2).eval()
    x = torch.randn(2, 2, 32, 32, 32)
    with torch.no_grad():
        tok = rearrange(bb.down_projection(x), "b c w h d -> b (w h d) c")
        ref, _ = bb.eva(tok)  # stock Eva forward (pos-embed + rope, no dropping)
        perm = torch.stack([torch.randperm(bb.num_tokens) for _ in range(2)])
        out, hidden = bb.forward_encoder(x, perm, return_layers=[1])
        full, _ = bb.forward_encoder(x, None)
    assert torch.allclose(full, ref, atol=1e-5)
    assert torch.allclose(out, torch.gather(ref, 1, perm[:, :, None].expand(-1, -1, ref.shape[-1])), atol=1e-5)
    assert hidden[1].shape == (2, bb.num_tokens, bb.embed_dim)


def test_random_mask_exact_count_and_uniform():
    g = torch.Generator().manual_seed(0)
    m = random_token_mask(4000, 64, 0.75, g)
    assert (m.sum(1) == 48).all()
    freq = m.float().mean(0)
    assert (freq - 0.75).abs().max() < 0.04  # each token masked with p = 0.75 (binomial sd ~0.007)
    keep, masked = mask_to_indices(m[:3])
    for i in range(3):
        assert not m[i, keep[i]].any() and m[i, masked[i]].all()
        assert (keep[i][1:] > keep[i][:-1]).all()


def test_patchify_order_matches_primus_tokens():
    x = torch.zeros(1, 1, 32, 32, 32)
    x[0, 0, 8:16, 16:24, 24:32] = 1  # grid cell (1, 2, 3) of a 4^3 grid
    p = patchify(x, (8, 8, 8))
    assert p.shape == (1, 64, 512)
    nz = torch.nonzero(p.abs().sum(-1)[0]).flatten().tolist()
    assert nz == [1 * 16 + 2 * 4 + 3]
    y = torch.randn(2, 3, 16, 24, 32)
    assert torch.equal(unpatchify(patchify(y, (8, 8, 8)), (8, 8, 8), 3, (2, 3, 4)), y)


def test_masked_mse_ignores_visible_tokens():
    pred, target = torch.randn(2, 10, 8), torch.randn(2, 10, 8)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, :4] = True
    l1 = masked_mse(pred, target, mask, norm_pix=True)
    pred2 = pred.clone()
    pred2[:, 4:] += 100
    assert torch.allclose(l1, masked_mse(pred2, target, mask, norm_pix=True))
    tn = (target - target.mean(-1, keepdim=True)) / (target.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(l1, ((pred[:, :4] - tn[:, :4]) ** 2).mean())


def test_pictures(tmp_path):
    torch.manual_seed(0)
    model = build_model(get_config("tiny"), 1)
    x = torch.rand(1, 1, 32, 32, 32)
    _, logs = compute_loss(model, x)
    # visible patches of the reconstruction equal the input, masked ones of the masked input are zero
    vis = ~logs["mask"][0]
    assert torch.allclose(patchify(logs["reconstruction"], (8, 8, 8))[0, vis], patchify(x, (8, 8, 8))[0, vis])
    assert (patchify(logs["masked_image"], (8, 8, 8))[0, ~vis] == 0).all()
    p = save_pictures_from_logs(str(tmp_path / "sub" / "recon.png"), x, logs, title="epoch 0")
    with open(p, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path / "sub") == ["recon.png"]


def test_optimizer_and_warmup_cosine_schedule():
    model = build_model(get_config("tiny"), 1)
    opt, sched = configure_optimizer(model, num_epochs=100, warmup_epochs=10)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.95)
    wds = {g["weight_decay"] for g in opt.param_groups}
    assert wds == {0.05, 0.0}
    no_decay = {id(p) for p in opt.param_groups[1]["params"]}
    assert id(model.eva.pos_embed) in no_decay and id(model.mae_decoder.mask_token) in no_decay
    lrs = []
    for e in range(100):
        sched.step(e)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-5) and lrs[9] == pytest.approx(1e-4)
    assert lrs[10] == pytest.approx(1e-4) and lrs[55] == pytest.approx(5e-5, rel=0.05)
    assert lrs[-1] < 1e-6 and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_user_errors():
    cfg = get_config("tiny")
    with pytest.raises(UserInputError, match="not divisible"):
        with_input_shape(cfg, (30, 32, 32))
    with pytest.raises(UserInputError, match="3D"):
        with_input_shape(cfg, (32, 32))
    bad = copy.deepcopy(cfg)
    bad["arch_kwargs"]["input_shape"] = [32, 36, 32]
    with pytest.raises(UserInputError, match="not divisible"):
        build_model(bad, 1)
    model = build_model(cfg, 1)
    with pytest.raises(UserInputError, match="2D"):
        compute_loss(model, torch.randn(2, 1, 32, 32))
    with pytest.raises(UserInputError, match="patch size"):
        compute_loss(model, torch.randn(2, 1, 32, 32, 40))
