"""Supervised fine-tuning data: chats (`prompt`/`response` or OpenAI-style `messages`) rendered through the
tokenizer's chat template, labelled on the assistant replies only (each reply's eos included), and batched
either one chat per row or several chats packed into a row with a block-diagonal causal mask."""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import jinja2
import numpy as np
import torch

from lmforge.data.errors import DataError, json_problem
from lmforge.data.labels import IGNORE
from lmforge.data.order import SeededOrder
from lmforge.tokenizer import Tokenizer

Example = tuple[list[int], list[int]]  # (input_ids, labels): aligned, IGNORE where no loss
Message = dict[str, str]
ROLES = ("system", "user", "assistant")
R = TypeVar("R")
_ENCODE_CHUNK = 1024  # chats tokenized per `encode_batch` call


# ---------------------------------------------------------------- records -> messages


def _text(obj: dict[str, Any], key: str) -> str:
    if key not in obj:
        raise DataError(f"missing '{key}' field")
    if not isinstance(obj[key], str):
        raise DataError(f"'{key}' is {type(obj[key]).__name__}, not a string")
    return obj[key]


def parse_messages(value: Any, name: str = "messages") -> list[Message]:
    """Check an OpenAI-style list of `{"role", "content"}` messages; raises `DataError` (without location)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"'{name}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where} is {type(m).__name__}, not an object")
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"{where}: missing '{key}'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise DataError(f"{where}: unknown role {role!r} (use {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise DataError(f"{where}: content is {type(content).__name__}, not a string")
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: empty assistant answer")
        out.append({"role": role, "content": content})
    return out


def prompt_messages(obj: dict[str, Any]) -> list[Message]:
    """The prompt of a record: `prompt` as a string (plus optional `system`) or as a message list."""
    if isinstance(obj.get("prompt"), list):
        return parse_messages(obj["prompt"], "prompt")
    msgs = [{"role": "system", "content": _text(obj, "system")}] if obj.get("system") is not None else []
    return [*msgs, {"role": "user", "content": _text(obj, "prompt")}]


def chat_from_record(obj: Any) -> list[Message]:
    """An SFT record (`prompt`/`response`[/`system`] or `messages`) as messages ending with the answer."""
    if not isinstance(obj, dict):
        raise DataError(f"not a JSON object but {type(obj).__name__}")
    if "messages" in obj:
        msgs = parse_messages(obj["messages"])
    else:
        if "prompt" not in obj and "response" not in obj:
            raise DataError("missing fields: need 'prompt' and 'response', or 'messages'")
        answer = _text(obj, "response")
        if not answer.strip():
            raise DataError("empty 'response'")
        msgs = [*prompt_messages(obj), {"role": "assistant", "content": answer}]
    if msgs[-1]["role"] != "assistant":
        raise DataError("the last message must be the assistant's answer")
    return msgs


# ---------------------------------------------------------------- rendering and labels


def render_chat(tokenizer: Tokenizer, messages: list[Message], first_labelled: int = 0
                ) -> tuple[str, list[tuple[int, int]]]:
    """The chat as text, and the character span of each assistant reply at index >= `first_labelled`: from the
    end of the generation prompt through the eos token that ends the turn (not what follows it).

    Spans come from rendering prefixes (messages[:i] with the generation prompt, then messages[:i+1]), which is
    only meaningful when each rendering extends the previous one; a template that rewrites earlier turns (e.g.
    drops past reasoning) raises ValueError."""

    def render(msgs: list[Message], gen: bool = False) -> str:
        return str(tokenizer.apply_chat_template(msgs, add_generation_prompt=gen))

    eos = tokenizer.eos_token
    full = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first_labelled:
            continue
        before, upto = render(messages[:i], gen=True), render(messages[:i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ValueError("the chat template is not prefix-consistent (rendering the chat up to message "
                             f"{i} is not a prefix of the longer chat), so answer-only labels cannot be found; "
                             "use a template whose rendering of each turn extends the previous one")
        end = upto.rfind(eos, len(before))
        if end < 0:
            raise ValueError(f"the chat template does not end an assistant turn with eos_token {eos!r}")
        spans.append((len(before), end + len(eos)))
    return full, spans


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]], eos_id: int
            ) -> list[int]:
    """Labels = ids on the tokens overlapping a reply span, IGNORE elsewhere; each span must end with eos."""
    labels, j = [IGNORE] * len(ids), 0
    for a, b in spans:
        while j < len(ids) and offsets[j][1] <= a:
            j += 1
        last = -1
        while j < len(ids) and offsets[j][0] < b:
            labels[j], last, j = ids[j], j, j + 1
        if last < 0 or ids[last] != eos_id:
            raise ValueError(f"the assistant reply does not end with the eos token (id {eos_id}); is eos_token "
                             "a special token of this tokenizer?")
    return labels


def encode_chat(tokenizer: Tokenizer, messages: list[Message], first_labelled: int = 0) -> Example:
    """(input_ids, labels) of a chat: labels are the ids of every assistant reply from message
    `first_labelled` on (its eos included), IGNORE elsewhere. The one labelling used by SFT and preferences."""
    text, spans = render_chat(tokenizer, messages, first_labelled)
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    return enc.ids, _labels(enc.ids, enc.offsets, spans, tokenizer.eos_id)


def truncate(ex: Example, max_len: int | None) -> tuple[Example | None, str]:
    """Cut to `max_len` tokens. Returns (example, "ok" | "truncated" | "dropped"): "truncated" when answer
    tokens were lost, "dropped" (example None) when none would be left to learn from."""
    ids, labels = ex
    if max_len is None or len(ids) <= max_len:
        return ex, "ok"
    # labels[0] never counts: the model-side shift predicts token t from the tokens before it
    kept = sum(1 for t in labels[1:max_len] if t != IGNORE)
    if kept == 0:
        return None, "dropped"
    lost = any(t != IGNORE for t in labels[max_len:])
    return (ids[:max_len], labels[:max_len]), "truncated" if lost else "ok"


# ---------------------------------------------------------------- reading files


@dataclass
class LoadStats:
    """What loading a file did; `summary()` ("path: counts") or `str()` (counts) is the line a recipe prints."""

    path: str
    unit: str = "examples"
    max_len: int | None = None
    lines: int = 0  # non-blank lines read
    kept: int = 0
    truncated: int = 0  # cut inside an answer (some answer tokens lost)
    dropped: int = 0  # the first answer token was past max_len: nothing left to learn from
    skipped: int = 0  # bad lines skipped (skip_bad_lines=True)
    skipped_examples: list[str] = field(default_factory=list)  # the first few messages
    tokens: int = 0
    label_tokens: int = 0

    def bad(self, msg: str, skip: bool) -> None:
        if not skip:
            raise DataError(msg)
        self.skipped += 1
        if len(self.skipped_examples) < 10:
            self.skipped_examples.append(msg)

    def count(self, status: str) -> None:
        if status == "truncated":
            self.truncated += 1
        elif status == "dropped":
            self.dropped += 1

    def __str__(self) -> str:
        limit = f" of max_len {self.max_len}" if self.max_len else ""
        s = (f"{self.kept:,} {self.unit} ({self.tokens:,} tokens, {self.label_tokens:,} answer tokens); "
             f"{self.truncated} truncated inside an answer, {self.dropped} dropped (answer starts past the "
             f"limit{limit}), {self.skipped} bad lines skipped")
        return s + (f" (first: {self.skipped_examples[0]})" if self.skipped_examples else "")

    def summary(self) -> str:
        return f"{self.path}: {self}"


def read_records(path: str | Path, parse: Callable[[Any], R], stats: LoadStats, skip_bad_lines: bool
                 ) -> Iterator[tuple[R, str]]:
    """Yield `(parse(obj), "file:line")` for each JSONL line; a bad line (invalid UTF-8, malformed JSON, or
    `parse` raising DataError) raises DataError naming file:line, or is counted in `stats` when skipping."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from e
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                stats.bad(f"{where}: invalid UTF-8 (byte {e.start} of the line)", skip_bad_lines)
                continue
            if not line.strip():
                continue
            stats.lines += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                stats.bad(f"{where}: {json_problem(e)}", skip_bad_lines)
                continue
            try:
                yield parse(obj), where
            except DataError as e:
                stats.bad(f"{where}: {e}", skip_bad_lines)


def encode_chats(tokenizer: Tokenizer, chats: Sequence[tuple[list[Message], int, str]], stats: LoadStats,
                 skip_bad_lines: bool) -> list[Example | None]:
    """`encode_chat` for many `(messages, first_labelled, "file:line")`, tokenized in batches on the Rust
    thread pool; a chat the template rejects (`raise_exception`) is a bad line (None when skipped)."""
    rendered: list[tuple[str, list[tuple[int, int]]] | None] = []
    for msgs, first, where in chats:
        try:
            rendered.append(render_chat(tokenizer, msgs, first))
        except jinja2.TemplateError as e:
            stats.bad(f"{where}: the chat template rejects this chat: {e}", skip_bad_lines)
            rendered.append(None)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
    out: list[Example | None] = []
    for start in range(0, len(rendered), _ENCODE_CHUNK):
        chunk = rendered[start:start + _ENCODE_CHUNK]
        encs = iter(tokenizer.backend.encode_batch([r[0] for r in chunk if r], add_special_tokens=False))
        for r, (_, _, where) in zip(chunk, chats[start:start + _ENCODE_CHUNK]):
            if r is None:
                out.append(None)
                continue
            e = next(encs)
            try:
                out.append((e.ids, _labels(e.ids, e.offsets, r[1], tokenizer.eos_id)))
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from err
    return out


def load_sft(path: str | Path, tokenizer: Tokenizer, *, max_len: int | None = None,
             skip_bad_lines: bool = False) -> tuple[list[Example], LoadStats]:
    """Read a JSONL file of chats into `(input_ids, labels)` examples of at most `max_len` tokens.

    Bad lines raise `DataError` naming file:line (or are counted with `skip_bad_lines`); truncated and dropped
    examples are counted in the returned stats, whose `summary()` the caller prints."""
    stats = LoadStats(str(path), max_len=max_len)
    chats = [(msgs, 0, where) for msgs, where in read_records(path, chat_from_record, stats, skip_bad_lines)]
    examples = []
    for ex in encode_chats(tokenizer, chats, stats, skip_bad_lines):
        if ex is None:
            continue
        ex, status = truncate(ex, max_len)
        stats.count(status)
        if ex is not None:
            examples.append(ex)
            stats.kept += 1
            stats.tokens += len(ex[0])
            stats.label_tokens += sum(1 for t in ex[1][1:] if t != IGNORE)
    if not examples:
        raise DataError(f"{path}: no usable examples ({stats})")
    return examples, stats


def eval_prompts(path: str | Path, tokenizer: Tokenizer, *, skip_bad_lines: bool = False
                 ) -> list[tuple[list[int], str]]:
    """(prompt_ids, reference answer) per chat: the chat before its last assistant turn, with the generation
    prompt, and that turn's text — for answer-accuracy evaluation by generation."""
    stats = LoadStats(str(path))
    out = []
    for msgs, where in read_records(path, chat_from_record, stats, skip_bad_lines):
        try:
            ids = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=True)
        except jinja2.TemplateError as e:
            stats.bad(f"{where}: the chat template rejects this chat: {e}", skip_bad_lines)
            continue
        out.append((list(ids), msgs[-1]["content"]))
    return out


# ---------------------------------------------------------------- batches


def pad_rows(rows: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted, right-padded (x, y) of shape (B, T), T = the longest row minus one: x = ids[:-1] (pad_id
    after), y = labels[1:] (IGNORE after)."""
    T = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.int64)
    y = torch.full((len(rows), T), IGNORE, dtype=torch.int64)
    for b, (ids, labels) in enumerate(rows):
        x[b, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[b, :len(ids) - 1] = torch.tensor(labels[1:])
    return x, y


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group item indices into rows of total length <= capacity: best-fit decreasing (each item, longest first,
    goes to the fullest row it fits in). Deterministic; each row lists its items in index order."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, row)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k < len(free):
            left, r = free.pop(k)
        else:
            left, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        bisect.insort(free, (left - lengths[i], r))
    return [sorted(r) for r in rows]


class SFTDataset:
    """Labelled chats as batches. Each example of n tokens fills n - 1 positions (x = ids[:-1], y = labels[1:]).

    Unpacked, a row is one example, right-padded to the longest in the batch (no mask needed). Packed, a row
    holds several examples (best-fit into `seq_len` positions) with a block-diagonal causal `mask` and
    `position_ids` restarting at 0 per example, so each example sees only itself, as if run alone."""

    def __init__(self, examples: Sequence[Example], pad_id: int, seq_len: int, pack: bool = False) -> None:
        for i, (ids, labels) in enumerate(examples):
            if len(ids) != len(labels) or len(ids) < 2:
                raise ValueError(f"example {i}: needs >= 2 tokens and as many labels as ids")
            if len(ids) - 1 > seq_len:
                raise ValueError(f"example {i} has {len(ids)} tokens, more than seq_len + 1 = {seq_len + 1}; "
                                 f"load it with max_len <= {seq_len + 1}")
        self.examples, self.pad_id, self.seq_len, self.pack = list(examples), pad_id, seq_len, pack
        lengths = [len(ids) - 1 for ids, _ in self.examples]
        self.rows = pack_rows(lengths, seq_len) if pack else [[i] for i in range(len(self.examples))]
        self.order = SeededOrder(len(self.rows))

    def __len__(self) -> int:
        """Rows per epoch: examples, or packed rows with pack=True."""
        return len(self.rows)

    def _collate(self, idx: Sequence[int] | np.ndarray) -> dict[str, Any]:
        if not self.pack:
            exs = [self.examples[self.rows[int(i)][0]] for i in idx]
            x, y = pad_rows(exs, self.pad_id)
            return {"x": x, "y": y, "n": int((y != IGNORE).sum()), "tokens": sum(len(ids) - 1 for ids, _ in exs)}
        rows = [[self.examples[e] for e in self.rows[int(i)]] for i in idx]
        T = max(sum(len(ids) - 1 for ids, _ in row) for row in rows)
        x = torch.full((len(rows), T), self.pad_id, dtype=torch.int64)
        y = torch.full((len(rows), T), IGNORE, dtype=torch.int64)
        pos = torch.zeros((len(rows), T), dtype=torch.int64)
        seg = torch.full((len(rows), T), -1, dtype=torch.int64)  # which example each position belongs to
        tokens = 0
        for b, row in enumerate(rows):
            t = 0
            for k, (ids, labels) in enumerate(row):
                n = len(ids) - 1
                x[b, t:t + n], y[b, t:t + n] = torch.tensor(ids[:-1]), torch.tensor(labels[1:])
                pos[b, t:t + n], seg[b, t:t + n] = torch.arange(n), k
                t += n
            pos[b, t:] = torch.arange(T - t)  # padding: one more segment, so no query row is all masked
            tokens += t
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        mask = (seg[:, :, None] == seg[:, None, :]) & causal  # (B, T, T): same example, not in the future
        return {"x": x, "y": y, "n": int((y != IGNORE).sum()), "tokens": tokens, "mask": mask[:, None],
                "position_ids": pos}

    def batch(self, step: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1
              ) -> dict[str, Any]:
        """This rank's rows of global batch `step`: `x`, `y` (B, T) int64, `n` = counted labels in these rows,
        `tokens` = real (non-pad) positions, + `mask` (B, 1, T, T) bool and `position_ids` (B, T) when packed.
        A pure function of (seed, step)."""
        return self._collate(self.order.indices(step, batch_size, seed, rank, world_size))

    def eval_batches(self, batch_size: int, max_batches: int | None = None, rank: int = 0, world_size: int = 1
                     ) -> Iterator[dict[str, Any]]:
        """Rows 0, 1, 2, ... in order, as batches like `batch`."""
        for idx in self.order.in_order(batch_size, max_batches, rank, world_size):
            yield self._collate(idx)
