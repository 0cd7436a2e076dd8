"""Hi-End-MAE: Primus key compatibility, hierarchical decoder reads blocks 9/6/3, overfit."""
import copy
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np
import pytest
import torch

from dynamic_network_architectures.architectures.primus import Primus
from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.hiend_mae import (
    HIEND_PAPER_CONFIG, build_model, compute_loss, configure_optimizer, default_attend_layers, get_config,
)
from nnssl_plugins.pretrain.mae_common import random_token_mask, mask_to_indices

torch.set_num_threads(1)
from conftest import SHARED_DATA

DATA = os.path.join(SHARED_DATA, "mr", "mni152_t1.nii.gz")


def _stock_primus(arch_kwargs, in_ch=1, num_classes=3, **over):
    kw = dict(arch_kwargs)
    kw["patch_embed_size"] = tuple(kw["patch_embed_size"])
    kw["input_shape"] = tuple(kw["input_shape"])
    kw.update(over)
    return Primus(input_channels=in_ch, num_classes=num_classes, **kw)


def _assert_superset(pretrain_sd, primus_sd):
    missing = [k for k in primus_sd if not k.startswith("up_projection.") and k not in pretrain_sd]
    assert not missing, missing
    bad = [(k, tuple(primus_sd[k].shape), tuple(pretrain_sd[k].shape)) for k in primus_sd
           if not k.startswith("up_projection.") and primus_sd[k].shape != pretrain_sd[k].shape]
    assert not bad, bad
    assert all(k.startswith("mae_decoder.") for k in pretrain_sd if k not in primus_sd)


def test_state_dict_contains_primus_encoder_keys_tiny():
    cfg = get_config("tiny")
    _assert_superset(build_model(cfg, 2).state_dict(), _stock_primus(cfg["arch_kwargs"], in_ch=2).state_dict())


def test_state_dict_contains_stock_primus_b_trainer_keys():
    """Exactly what nnUNet_Primus_B_Trainer builds: Primus(c, 792, (8,8,8), n, 12, 12, patch,
    drop_path_rate=0.2, scale_attn_inner=True, init_values=0.1). Built on the meta device (no memory)."""
    cfg = get_config("primus_b")
    with torch.device("meta"):
        stock = Primus(1, 792, (8, 8, 8), 4, 12, 12, (96, 96, 96), drop_path_rate=0.2, scale_attn_inner=True,
                       init_values=0.1)
        model = build_model(cfg, 1)
    _assert_superset(model.state_dict(), stock.state_dict())
    assert model.attend_layers == [9, 6, 3]
    assert model.mae_decoder.mask_token.shape[-1] == 528


def test_paper_config_shapes():
    with torch.device("meta"):
        model = build_model(copy.deepcopy(HIEND_PAPER_CONFIG), 1)
    assert model.num_tokens == 8 ** 3 and model.embed_dim == 1536 and len(model.eva.blocks) == 12
    assert model.eva.blocks[0].attn.num_heads == 16 and model.patch_size == (12, 12, 12)
    assert len(model.mae_decoder.self_blocks) == 2 and len(model.mae_decoder.cross_blocks) == 3


def test_default_attend_layers():
    assert default_attend_layers(12) == [9, 6, 3]
    assert default_attend_layers(24) == [18, 12, 6]
    assert default_attend_layers(4) == [2, 1, 0]
    cfg = get_config("tiny")
    cfg["method"]["attend_layers"] = [4]
    with pytest.raises(UserInputError, match="attend_layers"):
        build_model(cfg, 1)


def _deep_tiny():
    """12 encoder blocks (so the official 9/6/3 rule applies), tiny width."""
    cfg = get_config("tiny")
    cfg["arch_kwargs"].update(embed_dim=48, eva_numheads=2, eva_depth=12)
    cfg["method"]["attend_layers"] = None
    return cfg


def test_decoder_reads_encoder_blocks_9_6_3():
    torch.manual_seed(0)
    model = build_model(_deep_tiny(), 1).eval()
    assert model.attend_layers == [9, 6, 3]
    x = torch.randn(2, 1, 32, 32, 32)
    keep, _ = mask_to_indices(random_token_mask(2, model.num_tokens, 0.75, torch.Generator().manual_seed(0)))
    dec = model.mae_decoder

    # the memory of cross block k is exactly the projected output of eva.blocks[attend_layers[k]]
    block_out, proj_in = {}, {}
    hs = [model.eva.blocks[i].register_forward_hook(lambda m, a, o, i=i: block_out.__setitem__(i, o))
          for i in range(12)]
    hs += [p.register_forward_hook(lambda m, a, o, k=k: proj_in.__setitem__(k, a[0]))
           for k, p in enumerate(dec.memory_projs)]
    with torch.no_grad():
        base = model(x, keep)
        q_base = dec.query_proj(model.forward_encoder(x, keep)[0])
    for h in hs:
        h.remove()
    for k, layer in enumerate([9, 6, 3]):
        assert torch.equal(proj_in[k], block_out[layer])

    def _perturb(m, a, o):  # non-constant change (a constant shift per token would be removed by LayerNorm)
        return o + torch.randn(o.shape, generator=torch.Generator().manual_seed(3))

    def run(perturb_block=None, pin_query=False, perturb_memory=None):
        hooks = []
        if perturb_block is not None:
            hooks.append(model.eva.blocks[perturb_block].register_forward_hook(_perturb))
        if pin_query:  # freeze the query stream (final encoder output) at its unperturbed value
            hooks.append(dec.query_proj.register_forward_hook(lambda m, a, o: q_base))
        if perturb_memory is not None:
            hooks.append(dec.memory_projs[perturb_memory].register_forward_hook(_perturb))
        with torch.no_grad():
            out = model(x, keep)
        for h in hooks:
            h.remove()
        return out

    changed = lambda out: not torch.allclose(out, base, atol=1e-6)
    # each projected memory is read directly
    for k in range(3):
        assert changed(run(perturb_memory=k))
    # attended blocks influence the output even with the query stream pinned (direct read)
    for layer in (9, 6, 3):
        assert changed(run(perturb_block=layer, pin_query=True))
    # non-attended blocks after the deepest attended one (10, 11) act only through the chain:
    # they change the output, but not once the query stream is pinned
    for layer in (10, 11):
        assert changed(run(perturb_block=layer))
        assert torch.allclose(run(perturb_block=layer, pin_query=True), base, atol=1e-6)
    # a non-attended block below an attended one (e.g. 7) changes the output only via blocks >= 8, i.e. via
    # memory 9 and the query: pinning the query AND block 9's output removes its effect
    hooks = [model.eva.blocks[7].register_forward_hook(_perturb),
             model.eva.blocks[9].register_forward_hook(lambda m, a, o: block_out[9]),
             dec.query_proj.register_forward_hook(lambda m, a, o: q_base)]
    with torch.no_grad():
        out = model(x, keep)
    for h in hooks:
        h.remove()
    assert torch.allclose(out, base, atol=1e-6)


def _volume_crop(size=32):
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(sitk.ReadImage(DATA)).astype(np.float32)
    c = [s // 2 for s in arr.shape]
    crop = arr[c[0] - size // 2:c[0] + size // 2, c[1] - size // 2:c[1] + size // 2, c[2] - size // 2:c[2] + size // 2]
    crop = (crop - crop.mean()) / (crop.std() + 1e-6)
    return torch.from_numpy(np.ascontiguousarray(crop))[None, None]


def test_tiny_overfit_lowers_loss():
    torch.manual_seed(0)
    x = _volume_crop()
    model = build_model(get_config("tiny"), 1)
    opt, sched = configure_optimizer(model, num_epochs=150, warmup_epochs=3, lr=1e-3)
    losses = []
    for step in range(150):
        sched.step(step)
        # same volume, same mask every step -> the model must memorise it
        loss, logs = compute_loss(model, x, torch.Generator().manual_seed(0), return_pictures=False)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    assert logs["visible_tokens"].item() == 16
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < 0.7 * first, (first, last)
