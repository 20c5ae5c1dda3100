"""Pretraining batches: the token shards `prepare` wrote, read back as one stream cut into packed windows."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from lmforge.data.errors import DataError
from lmforge.data.order import SeededOrder
from lmforge.data.prepare import Manifest


class PackedDataset:
    """A split's shards as one token stream, cut into windows of `seq_len + 1` tokens (input, shifted target).

    Window i covers tokens [i*seq_len, (i+1)*seq_len + 1). `batch(step, ...)` is a pure function of
    (seed, step, batch_size): each epoch visits every window once in the order of a seeded permutation, so a
    resumed run at step N gets exactly the batch it would have got.
    """

    def __init__(self, data_dir: str | Path, split: str = "train", seq_len: int = 1024) -> None:
        self.data_dir, self.split, self.seq_len = Path(data_dir), split, seq_len
        self.manifest = Manifest.load(data_dir)
        if split not in self.manifest.splits:
            raise ValueError(f"no split {split!r} in {self.data_dir}/manifest.json")
        self.dtype = np.dtype(self.manifest.dtype)
        self._maps: list[np.memmap] = []
        for s in self.manifest.splits[split]:
            path = self.data_dir / s.file
            if not path.is_file() or path.stat().st_size != s.tokens * self.dtype.itemsize:
                raise DataError(f"{path}: missing or not {s.tokens} tokens long; re-run `lmforge prepare`")
            if s.tokens:
                self._maps.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(s.tokens,)))
        self._ends = np.cumsum([len(m) for m in self._maps], dtype=np.int64)
        self.n_tokens = int(self._ends[-1]) if len(self._ends) else 0
        self.n_windows = max(0, (self.n_tokens - 1) // seq_len)
        if self.n_windows == 0:
            raise DataError(f"{self.data_dir}: the {split} split has {self.n_tokens} tokens, fewer than "
                            f"seq_len + 1 = {seq_len + 1}")
        self.order = SeededOrder(self.n_windows)

    def __len__(self) -> int:
        return self.n_windows

    def window(self, i: int) -> np.ndarray:
        """Tokens [i*seq_len, (i+1)*seq_len + 1) of the stream, read across shard ends."""
        start, n = i * self.seq_len, self.seq_len + 1
        out = np.empty(n, dtype=self.dtype)
        k = int(np.searchsorted(self._ends, start, side="right"))
        off, filled = start - (int(self._ends[k - 1]) if k else 0), 0
        while filled < n:
            take = min(n - filled, len(self._maps[k]) - off)
            out[filled:filled + take] = self._maps[k][off:off + take]
            filled, k, off = filled + take, k + 1, 0
        return out

    def _rows(self, idx: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(np.stack([self.window(int(i)) for i in idx]).astype(np.int64))  # (B, T+1)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()  # (B, T), (B, T)

    def indices(self, step: int, batch_size: int, seed: int = 0, *, rank: int = 0, world_size: int = 1
                ) -> np.ndarray:
        """Window indices of this rank's rows of global batch `step` (a contiguous slice of it)."""
        return self.order.indices(step, batch_size, seed, rank, world_size)

    def batch(self, step: int, batch_size: int, seed: int = 0, *, rank: int = 0, world_size: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64, each (batch_size // world_size, seq_len): this rank's rows of global batch `step`."""
        return self._rows(self.indices(step, batch_size, seed, rank=rank, world_size=world_size))

    def eval_batches(self, batch_size: int, max_batches: int | None = None, *, rank: int = 0,
                     world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Windows 0, 1, 2, ... in order, in global batches sliced per rank like `batch`; the last partial
        batch is kept only when world_size == 1 (so every rank sees the same number of batches)."""
        for idx in self.order.in_order(batch_size, max_batches, rank, world_size):
            yield self._rows(idx)
