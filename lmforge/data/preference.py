"""Preference data: (prompt, chosen, rejected) triples, each answer rendered after the prompt through the chat
template and labelled on the answer only (the SFT labelling), batched as chosen rows then rejected rows."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.errors import DataError
from lmforge.data.labels import IGNORE
from lmforge.data.order import SeededOrder
from lmforge.data.sft import (
    Example,
    LoadStats,
    Message,
    encode_chats,
    pad_rows,
    parse_messages,
    prompt_messages,
    read_records,
    truncate,
)
from lmforge.tokenizer import Tokenizer

Pair = tuple[Example, Example]  # (chosen, rejected)


def _answer(obj: dict[str, Any], key: str) -> list[Message]:
    """`chosen` / `rejected`: a string, or a list of messages (multi-turn) ending with the assistant."""
    if key not in obj:
        raise DataError(f"missing '{key}' field")
    value = obj[key]
    if isinstance(value, list):
        msgs = parse_messages(value, key)
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"'{key}' must end with an assistant message")
        return msgs
    if not isinstance(value, str):
        raise DataError(f"'{key}' is {type(value).__name__}, not a string or a list of messages")
    if not value.strip():
        raise DataError(f"empty '{key}' answer")
    return [{"role": "assistant", "content": value}]


def pair_from_record(obj: Any) -> tuple[list[Message], list[Message], list[Message]]:
    """(prompt, chosen, rejected) messages of a preference record; chosen == rejected is an error."""
    if not isinstance(obj, dict):
        raise DataError(f"not a JSON object but {type(obj).__name__}")
    if "prompt" not in obj:
        raise DataError("missing 'prompt' field")
    prompt, chosen, rejected = prompt_messages(obj), _answer(obj, "chosen"), _answer(obj, "rejected")
    if chosen == rejected:
        raise DataError("'chosen' and 'rejected' are the same answer")
    return prompt, chosen, rejected


def load_preferences(path: str | Path, tokenizer: Tokenizer, *, max_len: int | None = None,
                     skip_bad_lines: bool = False) -> tuple[list[Pair], LoadStats]:
    """Read a JSONL file of preference records into (chosen, rejected) examples of at most `max_len` tokens.

    A pair is dropped (and counted) when either answer would start past `max_len`, counted as truncated when
    either loses answer tokens. Bad lines raise `DataError` naming file:line, or are counted when skipping."""
    stats = LoadStats(str(path), unit="pairs", max_len=max_len)
    chats = []
    for (prompt, chosen, rejected), where in read_records(path, pair_from_record, stats, skip_bad_lines):
        chats += [(prompt + chosen, len(prompt), where), (prompt + rejected, len(prompt), where)]
    encoded = encode_chats(tokenizer, chats, stats, skip_bad_lines)
    pairs = []
    for c, r in zip(encoded[0::2], encoded[1::2]):
        if c is None or r is None:
            if c is None and r is None:  # the template rejected both answers: one bad line, not two
                stats.skipped -= 1
            continue
        (c, sc), (r, sr) = truncate(c, max_len), truncate(r, max_len)
        if c is None or r is None:
            stats.count("dropped")
            continue
        stats.count("truncated" if "truncated" in (sc, sr) else "ok")
        pairs.append((c, r))
        stats.kept += 1
        stats.tokens += len(c[0]) + len(r[0])
        stats.label_tokens += sum(1 for ex in (c, r) for t in ex[1][1:] if t != IGNORE)
    if not pairs:
        raise DataError(f"{path}: no usable preference pairs ({stats})")
    return pairs, stats


class PreferenceDataset:
    """Preference pairs as batches: the B chosen rows, then the B rejected rows, as one (2B, T) batch for one
    pass through the model. Order is a pure function of (seed, step), sliced per rank like `SFTDataset`."""

    def __init__(self, pairs: Sequence[Pair], pad_id: int) -> None:
        for i, pair in enumerate(pairs):
            for ids, labels in pair:
                if len(ids) != len(labels) or len(ids) < 2:
                    raise ValueError(f"pair {i}: each answer needs >= 2 tokens and as many labels as ids")
        self.pairs, self.pad_id = list(pairs), pad_id
        self.order = SeededOrder(len(self.pairs))

    def __len__(self) -> int:
        return len(self.pairs)

    def _collate(self, idx: Sequence[int] | np.ndarray) -> dict[str, Any]:
        rows = [self.pairs[int(i)][0] for i in idx] + [self.pairs[int(i)][1] for i in idx]
        x, y = pad_rows(rows, self.pad_id)  # (2B, T)
        lengths = torch.tensor([len(ids) - 1 for ids, _ in rows])  # (2B,) non-pad positions per row
        return {"x": x, "y": y, "n": len(idx), "tokens": int(lengths.sum()), "lengths": lengths}

    def batch(self, step: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1
              ) -> dict[str, Any]:
        """This rank's pairs of global batch `step`: `x`, `y` (2B, T) int64 (chosen rows first), `n` = B pairs."""
        return self._collate(self.order.indices(step, batch_size, seed, rank, world_size))

    def eval_batches(self, batch_size: int, max_batches: int | None = None, rank: int = 0, world_size: int = 1
                     ) -> Iterator[dict[str, Any]]:
        """Pairs 0, 1, 2, ... in order, as batches like `batch`."""
        for idx in self.order.in_order(batch_size, max_batches, rank, world_size):
            yield self._collate(idx)
