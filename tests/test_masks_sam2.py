"""SAM2 backend: real SAM2 model (package config, random weights), real automatic generator +
bidirectional video propagation (in-memory frame shim) on a small volume, then the store."""
import numpy as np
import pytest
import torch

from nnssl_plugins.pretrain.masks import MaskStore, write_store
from nnssl_plugins.pretrain.masks.backends import CaseInput
from nnssl_plugins.pretrain.masks.backends.sam2 import Sam2Backend, choose_axis, seed_slices


def test_axis_and_seed_slices():
    assert choose_axis((1.5, 1.5, 1.5)) == 0
    assert choose_axis((5.0, 0.8, 0.8)) == 0
    assert choose_axis((0.8, 0.8, 5.0)) == 2
    assert seed_slices(100, 1.5, 15.0) == list(range(5, 100, 10))
    assert seed_slices(3, 3.0, 15.0) == [1]


def test_sam2_random_model_generate_and_propagate(tmp_path):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.1, (10, 64, 64)).astype(np.float32)
    x[2:8, 10:40, 10:40] += 2.0
    x[1:9, 40:60, 30:60] -= 1.0
    be = Sam2Backend(checkpoint=None, allow_random_weights=True, config="configs/sam2.1/sam2.1_hiera_t.yaml",
                     image_size=256, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                     max_masks_per_slice=3, min_area=20, min_volume=50, interval_mm=100.0, seed=0)
    calls = {"gen": 0, "prop": 0}
    orig_slice, orig_prop = be.slice_masks, be.propagate

    def slice_masks(frame):
        calls["gen"] += 1
        assert frame.dtype == np.float32 and frame.shape == (64, 64, 3)
        anns = orig_slice(frame)
        assert 1 <= len(anns) <= 3
        return anns

    def propagate(state, seed, anns, n, hw):
        calls["prop"] += 1
        assert state["num_frames"] == 10 and state["images"].shape[-1] == 256  # shim fed the whole stack
        pred = be._predictor
        orig_piv = pred.propagate_in_video
        visited = []

        def piv(st, start_frame_idx=None, max_frame_num_to_track=None, reverse=False):
            assert len(st["obj_ids"]) == len(anns)  # all objects added before propagating
            for out in orig_piv(st, start_frame_idx=start_frame_idx, reverse=reverse):
                visited.append((reverse, out[0]))
                yield out

        pred.propagate_in_video = piv
        try:
            vol = orig_prop(state, seed, anns, n, hw)
        finally:
            pred.propagate_in_video = orig_piv
        assert vol.shape == (len(anns), 10, 64, 64)
        # forward seed..end and reverse seed..0 -> every frame covered
        assert sorted(f for r, f in visited if not r) == list(range(seed, 10))
        assert sorted(f for r, f in visited if r) == list(range(0, seed + 1))
        assert vol[:, seed].any()
        return vol

    be.slice_masks, be.propagate = slice_masks, propagate
    masks = be.generate(CaseInput("c", x[None], (3.0, 1.5, 1.5), None))
    assert calls == {"gen": 1, "prop": 1}  # 10 slices * 3 mm, one seed every 100 mm -> one seed
    assert len(masks) >= 1
    for m in masks:
        assert m.meta["seed_axis"] == 0 and m.meta["seed_slice"] == 4 and m.voxels >= 50
        assert m.bbox[0] <= 4 < m.bbox[1]
    p = str(tmp_path / "c.nnsslmask")
    write_store(p, x.shape, masks, be.name, be.params, case_id="c")
    st = MaskStore.open(p)
    assert len(st) == len(masks) and st.meta["params"]["points_per_side"] == 4
    assert np.array_equal(st.mask(0), masks[0].dense(x.shape))


def test_missing_checkpoint_message():
    from nnssl_plugins.errors import UserInputError

    with pytest.raises(UserInputError, match="required"):
        Sam2Backend(checkpoint=None)
    with pytest.raises(UserInputError, match="no such config"):
        Sam2Backend(checkpoint=None, allow_random_weights=True, config="sam2.1_hiera_t.yaml")
