"""The order in which a dataset's items are batched: a pure function of (seed, step), so a resumed run gets
exactly the batches it would have got, and each rank of a distributed run its own slice of them."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class SeededOrder:
    """Which items global batch `step` holds: each epoch visits all `n` items once in the order of a permutation
    seeded by (seed, epoch), and rank r takes the r-th contiguous slice — a pure function of (seed, step)."""

    def __init__(self, n: int) -> None:
        if n <= 0:
            raise ValueError("no items to batch")
        self.n = n
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _perm(self, seed: int, epoch: int) -> np.ndarray:
        if (seed, epoch) not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(next(iter(self._perms)))
            self._perms[(seed, epoch)] = np.random.default_rng((seed, epoch)).permutation(self.n)
        return self._perms[(seed, epoch)]

    def indices(self, step: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        per = _per_rank(batch_size, world_size)
        g = step * batch_size + rank * per + np.arange(per, dtype=np.int64)  # global sample numbers
        epoch, pos = g // self.n, g % self.n
        out = np.empty(per, dtype=np.int64)
        for e in np.unique(epoch):
            m = epoch == e
            out[m] = self._perm(seed, int(e))[pos[m]]
        return out

    def in_order(self, batch_size: int, max_batches: int | None = None, rank: int = 0, world_size: int = 1
                 ) -> Iterator[np.ndarray]:
        """Items 0, 1, 2, ... in global batches sliced per rank; the last partial batch only when world_size
        is 1 (so every rank sees the same number of batches)."""
        per = _per_rank(batch_size, world_size)
        n = self.n if max_batches is None else min(self.n, max_batches * batch_size)
        for start in range(0, n, batch_size):
            if start + batch_size > n and world_size > 1:
                break
            yield np.arange(start, min(start + batch_size, n))[rank * per:(rank + 1) * per]


def _per_rank(batch_size: int, world_size: int) -> int:
    if batch_size <= 0 or batch_size % world_size:
        raise ValueError(f"global batch_size {batch_size} must be positive and divisible by world_size "
                         f"{world_size}")
    return batch_size // world_size
