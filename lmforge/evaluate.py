"""Evaluation: perplexity on held-out text, accuracy on multiple-choice questions (scored by log-likelihood)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.data.errors import DataError
from lmforge.kernels import accelerate
from lmforge.model import Transformer
from lmforge.utils import progress_bar


def _ready(model: Transformer) -> None:
    """Refuses a model with a KV cache set up; swaps the fast modules in (`kernels.accelerate`)."""
    if model.cache_len is not None:
        raise ValueError("the model has a KV cache set up; call model.clear_cache() before evaluating")
    accelerate(model, training=False)


@torch.inference_mode()
def perplexity(model: Transformer, tokenizer: Any, path_or_texts: str | os.PathLike | Sequence[str],
               seq_len: int | None = None, batch_size: int = 1, progress: bool = True,
               score_from: int = 0) -> dict[str, float]:
    """Mean next-token loss and its exp (perplexity) over a .txt / .jsonl / .parquet file or a list of texts.

    Convention: each document is encoded as `tokenizer.encode` does by default (bos only if the tokenizer
    adds one) and followed by eos; all are concatenated and cut into non-overlapping windows of `seq_len`
    tokens (default: the model's context), the last one shorter. Inside a window every token but the first
    is predicted from the ones before it in that window (no context carries over), so a window of n tokens
    scores n - 1 — the same as `transformers`' `model(window, labels=window).loss`. `tokens` counts the scored
    tokens; `loss` is their mean negative log-likelihood in nats.

    score_from > 0: only full windows, and in each only the tokens after its first `score_from + 1` (those give
    context): llama.cpp's `llama-perplexity -c N` is score_from = N // 2, on one text without eos (for a
    tokenizer that adds no bos, such as SmolLM2's; llama.cpp puts bos first in every window of one that does)."""
    _ready(model)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seq_len = seq_len or model.config.max_seq_len
    if not 2 <= seq_len <= model.config.max_seq_len:
        raise ValueError(f"seq_len={seq_len} must be in [2, the model's context {model.config.max_seq_len}]")
    if isinstance(path_or_texts, (str, os.PathLike)):
        from lmforge.data.documents import iter_documents

        texts: Sequence[str] = [doc for doc, _ in iter_documents(path_or_texts)]
    else:
        texts = path_or_texts
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text) + [tokenizer.eos_id]
    if not 0 <= score_from <= seq_len - 2:
        raise ValueError(f"score_from={score_from} must be in [0, seq_len - 2 = {seq_len - 2}]")
    windows = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    windows = [w for w in windows if len(w) >= 2 and (not score_from or len(w) == seq_len)]
    if not windows:
        raise ValueError("perplexity needs at least 2 tokens of text")
    full = [w for w in windows if len(w) == seq_len]
    batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[w] for w in windows if len(w) < seq_len]
    nll, n = 0.0, 0
    for batch in progress_bar(batches, desc="perplexity", unit="batch", disable=not progress):
        x = torch.tensor(batch, device=model.device)  # (B, T)
        logits = model(x[:, :-1])[:, score_from:]  # (B, T - 1 - score_from, vocab)
        targets = x[:, 1 + score_from:]  # (B, T - 1 - score_from)
        nll += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
        n += targets.numel()
    return {"loss": nll / n, "ppl": math.exp(nll / n), "tokens": n}


def _read_choices(path: Path) -> list[tuple[str, list[str], int]]:
    """(question, choices, answer index) per line; a bad line raises DataError naming file:line."""
    items = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object with question, choices, answer")
            question, choices, answer = obj.get("question"), obj.get("choices"), obj.get("answer")
            if not isinstance(question, str) or not question:
                raise DataError(f"{where}: 'question' must be a non-empty string")
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
                raise DataError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
            if isinstance(answer, str):
                if answer not in choices:
                    raise DataError(f"{where}: answer {answer!r} is not one of the choices")
                answer = choices.index(answer)
            elif not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
                raise DataError(f"{where}: 'answer' must be a choice index in [0, {len(choices)}) or the choice text,"
                                f" got {answer!r}")
            items.append((question, choices, answer))
    if not items:
        raise DataError(f"{path}:1: no questions")
    return items


@torch.inference_mode()
def choice_logprobs(model: Transformer, tokenizer: Any, question: str, choices: Sequence[str]) -> list[float]:
    """Sum of log p(choice tokens | question) per choice. A choice is scored as " " + choice unless the
    question ends or the choice starts with whitespace; question and choice are encoded separately so every
    choice sees the same context tokens (left-truncated to the model's context)."""
    ctx = tokenizer.encode(question)
    conts = [tokenizer.encode(c if question[-1:].isspace() or c[:1].isspace() else " " + c, add_bos=False)
             for c in choices]
    limit = model.config.max_seq_len
    seqs = [(ctx + c)[-limit:] for c in conts]
    if any(len(c) >= limit for c in conts):
        raise ValueError(f"a choice of {max(map(len, conts))} tokens leaves no context in {limit} tokens")
    T = max(map(len, seqs))
    x = torch.tensor([s + [0] * (T - len(s)) for s in seqs], device=model.device)  # (C, T), right-padded
    logp = model(x).float().log_softmax(-1)  # (C, T, vocab); right padding does not change earlier logits
    scores = []
    for i, (s, c) in enumerate(zip(seqs, conts)):
        targets = torch.tensor(s[len(s) - len(c):], device=model.device)  # (len(c),)
        rows = logp[i, len(s) - len(c) - 1:len(s) - 1]  # (len(c), vocab): the logits that predict them
        scores.append(rows.gather(-1, targets[:, None]).sum().item())
    return scores


def multiple_choice(model: Transformer, tokenizer: Any, path: str | os.PathLike,
                    progress: bool = True) -> dict[str, float]:
    """Accuracy on a JSONL of {"question", "choices": [str, ...], "answer": index or choice text}.

    The prediction is the choice with the highest summed log-prob (`choice_logprobs`); `accuracy_norm`
    divides each score by the choice's length in characters first (lm-evaluation-harness's acc_norm)."""
    _ready(model)
    path = Path(path)
    items = _read_choices(path)
    hits = hits_norm = 0
    for question, choices, answer in progress_bar(items, desc="multiple choice", unit="q", disable=not progress):
        scores = choice_logprobs(model, tokenizer, question, choices)
        normed = [s / len(c) for s, c in zip(scores, choices)]
        hits += max(range(len(choices)), key=scores.__getitem__) == answer
        hits_norm += max(range(len(choices)), key=normed.__getitem__) == answer
    return {"accuracy": hits / len(items), "accuracy_norm": hits_norm / len(items), "n": len(items)}
