"""Pretraining under nnU-Net's DDP (`-num_gpus N`), the parts that are ours or that we rely on, on a 2-process
CPU gloo group (no training run: DDP training itself is GPU-only in nnU-Net):

* per-rank batch split: nnU-Net's `_set_batch_size_and_oversample` (global batch 5 → 3 + 2; our trainers set
  oversampling to 0, so no rank oversamples),
* loss reduction: `nnsslPretrainTrainer._mean_over_ranks` (all_gather_object → mean over every rank's values,
  ranks may hold different numbers of values),
* samplers: nnU-Net's infinite DataLoader picks cases with the global `np.random`; with a seed, `seed_epoch` seeds
  it (and the loader's own `rs`) per (seed, rank, epoch) → ranks draw different scans, reproducibly.
`-num_gpus 2 -device cpu` → clear error: tests/test_bad_input_table.py.
"""
from __future__ import annotations

import json
import os
import socket
import types


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import numpy as np
    import torch
    import torch.distributed as dist
    from batchgenerators.dataloading.data_loader import DataLoader
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnssl_plugins.trainers.pretrain_base import nnsslPretrainTrainer, seed_epoch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {}
        # batch split, exactly the code nnU-Net runs in initialize() under DDP
        fake = types.SimpleNamespace(is_ddp=True, configuration_manager=types.SimpleNamespace(batch_size=5),
                                     oversample_foreground_percent=0.0)
        nnUNetTrainer._set_batch_size_and_oversample(fake)
        res["batch_size"], res["oversample"] = int(fake.batch_size), float(fake.oversample_foreground_percent)
        # loss reduction
        fake = types.SimpleNamespace(is_ddp=True)
        values = [1.0, 2.0, 3.0] if rank == 0 else [10.0]
        res["mean"] = nnsslPretrainTrainer._mean_over_ranks(fake, values)

        # sampler: batchgenerators DataLoader as nnU-Net builds it (infinite, unseeded RandomState)
        class Keys(DataLoader):
            def __init__(self):
                super().__init__([f"case{i:02d}" for i in range(20)], 2, 1, None, True, False, True)
                self.indices = list(self._data)

            def generate_train_batch(self):
                return self.get_indices()

        def draw(seed):
            aug = SingleThreadedAugmenter(Keys(), None)
            next(aug)  # nnU-Net's warm-up batch, unseeded
            assert seed_epoch(seed, rank, 0, (aug,))  # what the trainer does at every epoch start
            return [str(k) for _ in range(10) for k in next(aug)]

        res["keys"] = draw(7)
        res["keys_again"] = draw(7)
        gathered = [None] * world
        dist.all_gather_object(gathered, res["keys"])
        res["all_keys"] = gathered
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
        np.testing.assert_equal(len(gathered), world)
    finally:
        dist.destroy_process_group()


def test_ddp_batch_split_reduction_and_sampler(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [json.load(open(tmp_path / f"rank{i}.json")) for i in range(2)]
    assert [x["batch_size"] for x in r] == [3, 2] and all(x["oversample"] == 0.0 for x in r)
    assert all(abs(x["mean"] - 4.0) < 1e-12 for x in r)  # (1 + 2 + 3 + 10) / 4: every value weighs the same
    assert all(x["keys"] == x["keys_again"] for x in r)   # reproducible per rank
    assert r[0]["keys"] != r[1]["keys"]                    # ranks draw different scans
    assert r[0]["all_keys"] == r[1]["all_keys"] == [r[0]["keys"], r[1]["keys"]]
