"""PackedDataset: packed windows across shard ends, batches as a function of (seed, step), rank slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data import prepare as preparing
from lmforge.data.errors import DataError
from lmforge.data.prepare import prepare
from lmforge.data.pretrain import PackedDataset
from tests.data.test_prepare import small_tok, write_corpus


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of a small corpus, cut into many parts (so windows cross shard ends); the tests only read them."""
    d = tmp_path_factory.mktemp("packed")
    write_corpus(d / "corpus")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(preparing, "MIN_PART_BYTES", 1500)
        prepare([d / "corpus"], small_tok(), d / "data", shard_tokens=100, val_fraction=0.2, workers=1,
                progress=False)
    return d / "data"


def test_packed_windows(prepared: Path) -> None:
    ds = PackedDataset(prepared, "train", seq_len=16)
    m = ds.manifest
    stream = np.concatenate([np.fromfile(prepared / s.file, dtype=m.dtype) for s in m.splits["train"]])
    assert len(m.splits["train"]) > 3 and len(ds) == (len(stream) - 1) // 16
    for i in range(len(ds)):  # windows that cross shard ends read correctly
        assert (ds.window(i) == stream[i * 16:i * 16 + 17]).all()
    x, y = ds.batch(0, 4)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert (x[:, 1:] == y[:, :-1]).all()


def test_batch_is_a_function_of_seed_and_step(prepared: Path) -> None:
    ds = PackedDataset(prepared, "train", seq_len=16)
    again = PackedDataset(prepared, "train", seq_len=16)
    x5, y5 = ds.batch(5, 8, seed=3)
    ds.batch(6, 8, seed=3)
    assert torch.equal(again.batch(5, 8, seed=3)[0], x5) and torch.equal(ds.batch(5, 8, seed=3)[1], y5)
    assert not torch.equal(ds.batch(6, 8, seed=3)[0], x5)
    assert not torch.equal(ds.batch(5, 8, seed=4)[0], x5)
    # one epoch visits every window once
    n = len(ds)
    seen = np.concatenate([ds.indices(s, 8, seed=3) for s in range(n // 8)])
    assert len(set(seen.tolist())) == len(seen) == n // 8 * 8


def test_rank_slices(prepared: Path) -> None:
    ds = PackedDataset(prepared, "train", seq_len=16)
    gx, gy = ds.batch(7, 8, seed=1)
    parts = [ds.batch(7, 8, seed=1, rank=r, world_size=4) for r in range(4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), gx)
    assert torch.equal(torch.cat([p[1] for p in parts]), gy)
    idx = [set(ds.indices(7, 8, seed=1, rank=r, world_size=4).tolist()) for r in range(4)]
    assert sum(len(i) for i in idx) == len(set().union(*idx)) == 8
    with pytest.raises(ValueError, match="divisible"):
        ds.batch(0, 6, rank=0, world_size=4)


def test_eval_batches(prepared: Path) -> None:
    ds = PackedDataset(prepared, "val", seq_len=8)
    batches = list(ds.eval_batches(4))
    assert sum(len(x) for x, _ in batches) == len(ds)
    assert torch.equal(batches[0][0][1], torch.from_numpy(ds.window(1)[:-1].astype(np.int64)))
    assert len(list(ds.eval_batches(4, max_batches=2))) == 2
    two = [list(ds.eval_batches(4, rank=r, world_size=2)) for r in range(2)]
    assert len(two[0]) == len(two[1]) == len(ds) // 4
    assert torch.equal(torch.cat([two[0][0][0], two[1][0][0]]), batches[0][0])


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="manifest.json"):
        PackedDataset(tmp_path, "train", 8)
