"""SeededOrder: a batch is a pure function of (seed, step); epochs visit every item once; ranks slice batches."""

from __future__ import annotations

import numpy as np
import pytest

from lmforge.data.order import SeededOrder


def test_batches_are_a_function_of_seed_and_step() -> None:
    a, b = SeededOrder(50), SeededOrder(50)
    for step in (9, 0, 3, 9):  # any order of asking: the cache of permutations changes nothing
        assert (a.indices(step, 8, seed=1) == b.indices(step, 8, seed=1)).all()
    assert not (a.indices(3, 8, seed=1) == a.indices(3, 8, seed=2)).all()


def test_each_epoch_visits_every_item_once() -> None:
    order = SeededOrder(12)
    seen = np.concatenate([order.indices(s, 4, seed=0) for s in range(6)])  # two epochs
    assert sorted(seen[:12]) == sorted(seen[12:]) == list(range(12))
    assert not (seen[:12] == seen[12:]).all()  # each epoch its own permutation
    across = order.indices(2, 5, seed=0)  # samples 10..14: the end of epoch 0, the start of epoch 1
    assert (across[:2] == seen[10:12]).all() and (across[2:] == order.indices(4, 3, seed=0)).all()


def test_ranks_take_contiguous_slices() -> None:
    order = SeededOrder(40)
    whole = order.indices(5, 8, seed=3)
    assert (np.concatenate([order.indices(5, 8, 3, rank=r, world_size=4) for r in range(4)]) == whole).all()
    with pytest.raises(ValueError, match="divisible"):
        order.indices(0, 6, 0, rank=0, world_size=4)
    with pytest.raises(ValueError, match="no items"):
        SeededOrder(0)


def test_in_order_keeps_a_partial_batch_only_on_one_process() -> None:
    order = SeededOrder(10)
    assert [b.tolist() for b in order.in_order(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [b.tolist() for b in order.in_order(4, max_batches=1)] == [[0, 1, 2, 3]]
    assert [b.tolist() for b in order.in_order(4, rank=1, world_size=2)] == [[2, 3], [6, 7]]
