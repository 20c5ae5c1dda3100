"""Continuous batching: many requests share one batched decode step over the model's KV cache.

Each request owns a row of the cache (a slot). A new request is prefilled into a free row between two decode
steps while the other rows keep their sequences (per-row cache positions, `Transformer.forward`); each step
then decodes one token for every active row at once; a finished or cancelled request frees its row at once.
The model runs on one thread of its own (`Batcher.start`), so the HTTP server's event loop never waits on it.

Picking tokens and cutting text reuse `lmforge.generate` (sample, TextStream, stop ids and stop strings), so a
request's greedy tokens are those `generate` gives for its prompt alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.generate import (
    GenerationConfig,
    Row,
    TextStream,
    accept_token,
    apply_repetition_penalty,
    decode_one_token,
    prefill,
    sample,
    stop_ids,
    unseen_text,
)
from lmforge.kernels import accelerate
from lmforge.kernels.step import native_step
from lmforge.model import Transformer

log = logging.getLogger("lmforge.serve")


class QueueFull(Exception):
    """Every slot is busy and the waiting line is full: the client should retry later."""


class Stopped(Exception):
    """The batcher is shutting down and takes no new requests."""


@dataclass
class TokenLogprob:
    """One chosen token's log-probability and the `top` most likely alternatives (token id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """What a request gets after each of its tokens: new text (possibly empty: held back), the token, and on
    the last event why it ended: "stop" (a stop id or string), "length" (max tokens or the context),
    "cancelled" or "error" (then `error` says what)."""

    text: str
    token: int | None = None  # None when the token was a stop id (not part of the output)
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None
    error: str | None = None
    completion_tokens: int = 0  # tokens the model produced so far, a final stop id included


@dataclass
class Request:
    """A prompt (ids) and how to continue it. `emit` is called on the batcher's thread with each `Event`; it
    must not block (the server hands events to its event loop)."""

    prompt: Sequence[int]
    config: GenerationConfig
    emit: Callable[[Event], None]
    logprobs: int | None = None  # None: no log-probabilities; k >= 0: the chosen token's and the top k
    ignore_eos: bool = False  # go on past the tokenizer's eos (fixed-length replies for benchmarks)
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class _Slot:
    request: Request
    row: Row
    n_new: int  # tokens this request may produce (max_new_tokens, cut to the context)
    stops: set[int]  # ids that end it (not part of the output)
    generator: torch.Generator | None
    seen: torch.Tensor | None  # (1, vocab) tokens of prompt and output, for the repetition penalty
    pos: int = 0  # cache slots filled: the next token goes there
    token: int = 0  # the last token picked, fed to the next step
    sent: int = 0  # characters of row.text already emitted
    produced: int = 0


@dataclass
class Stats:
    """Counters the server exports (read without a lock: each is written by the batcher's thread only)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    steps: int = 0
    step_rows: int = 0  # sum over steps of the rows decoded
    first_token_seconds: list[float] = field(default_factory=list)  # drained by the server


class Batcher:
    """Runs `model` over up to `slots` requests at once. `context`: cache slots per request (prompt + output);
    `max_waiting`: requests that may wait for a slot beyond the free ones before `submit` refuses (QueueFull)."""

    def __init__(self, model: Transformer, tokenizer: Any, slots: int = 8, context: int | None = None,
                 max_waiting: int = 64) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.model, self.tokenizer = model, tokenizer
        self.slots, self.max_waiting = slots, max_waiting
        self.context = min(context or model.config.max_seq_len, model.config.max_seq_len)
        self.pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.waiting: deque[Request] = deque()
        self.active: list[_Slot | None] = [None] * slots
        self.stats = Stats()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        accelerate(model, training=False)
        model.setup_cache(slots, self.context)
        self.native = native_step(model, slots)  # a covered CPU model: each step in one C++ call (kernels/step.py)

    # ---- the server's side ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lmforge-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ends the loop: waiting requests are cancelled, active ones end with finish_reason "cancelled"."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: Request) -> None:
        self.submit_all([request])

    def submit_all(self, requests: Sequence[Request]) -> None:
        """Queues every request, or none (QueueFull when they do not all fit the waiting line)."""
        for r in requests:
            if len(r.prompt) == 0:
                raise ValueError("the prompt needs at least one token")
            if len(r.prompt) >= self.context:
                raise ValueError(f"the prompt has {len(r.prompt)} tokens but the context is {self.context} "
                                 "tokens (prompt and reply together)")
        with self._wake:
            if self._stopping:
                raise Stopped("the server is shutting down")
            free = self.slots - self.busy  # requests the loop takes at its next turn
            if len(self.waiting) + len(requests) > self.max_waiting + free:
                raise QueueFull(f"{self.busy} of {self.slots} slots are busy and {len(self.waiting)} requests wait")
            self.waiting.extend(requests)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        """Stops `request` (its client left): its slot is freed before the next step."""
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def busy(self) -> int:
        return sum(s is not None for s in self.active)

    # ---- the model's side ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopping and not self.waiting and not any(self.active):
                        self._wake.wait()
                    if self._stopping:
                        break
                    free = [b for b, s in enumerate(self.active) if s is None]
                    admit = []
                    while free and self.waiting:
                        request = self.waiting.popleft()
                        if request.cancelled:  # its client left while it waited
                            request.emit(Event("", finish_reason="cancelled"))
                        else:
                            admit.append((free.pop(0), request))
                for group in _runs(admit):  # requests taking consecutive rows are prefilled together
                    self._guarded(self._admit, group)
                if any(self.active):
                    self._guarded(self._step)
            self._end_all()

    def _guarded(self, fn: Callable[..., None], group: list[tuple[int, Request]] | None = None) -> None:
        """Runs a prefill (`_admit(group)`: [(row, request)]) or a step (every row, group None); a failure ends
        the requests it touched with an error, never the loop."""
        try:
            fn(*([] if group is None else [group]))
        except Exception as e:  # e.g. out of memory: those requests end with a clean error, the server goes on
            log.exception("generation failed")
            error = f"generation failed: {type(e).__name__}"
            rows = None if group is None else {b for b, _ in group}
            for b, request in group or []:
                if self.active[b] is None or self.active[b].request is not request:
                    request.emit(Event("", finish_reason="error", error=error))  # failed before it took its row
            for b, slot in enumerate(self.active):
                if slot is not None and (rows is None or b in rows):
                    self._finish(b, "error", error)

    def _admit(self, group: list[tuple[int, Request]]) -> None:
        """Prefills the prompts of `group` ([(row, request)], consecutive rows) in one forward, right-padded,
        into their cache rows, and picks each one's first token."""
        taken = [(b, request) for b, request in group if self._take(b, request)]
        for run in _runs(taken):  # (one that ended at once left a gap)
            lengths = [len(request.prompt) for _, request in run]
            ids = torch.tensor([list(r.prompt) + [self.pad] * (max(lengths) - n) for (_, r), n in zip(run, lengths)],
                               device=self.model.device)  # (k, longest)
            first = run[0][0]
            rows, lengths_t = slice(first, first + len(run)), torch.tensor(lengths) if len(run) > 1 else None
            if self.native is not None and self.native.takes_prompt(ids.numel()):  # short prompts: the C++ step too
                logits = self.native.prefill(ids, lengths=lengths_t, cache_rows=rows)  # (k, vocab)
            else:
                logits = prefill(self.model, ids, cache_rows=rows, lengths=lengths_t)  # (k, vocab)
            for i, (b, request) in enumerate(run):
                self.stats.first_token_seconds.append(time.perf_counter() - request.submitted)
                self._advance(b, logits[i:i + 1])

    def _take(self, b: int, request: Request) -> bool:
        """Gives `request` row b (its sampling state, limits and stops); False when it has no room to generate
        (it ends at once with finish_reason "length")."""
        cfg, P = request.config, len(request.prompt)
        device = self.model.device
        generator = None
        if cfg.temperature > 0:  # each request its own: a seed gives the same reply whatever else runs
            generator = torch.Generator(device=device)
            if cfg.seed is not None:
                generator.manual_seed(cfg.seed)
            else:
                generator.seed()
        seen = None
        if cfg.repetition_penalty != 1.0:
            seen = torch.zeros(1, self.model.config.vocab_size, dtype=torch.bool, device=device)
            seen[0, torch.tensor(list(request.prompt), device=device)] = True
        slot = _Slot(request, Row(decoder=TextStream(self.tokenizer)), min(cfg.max_new_tokens, self.context - P),
                     stop_ids(None if request.ignore_eos else self.tokenizer, cfg.stop_ids), generator, seen, pos=P)
        self.active[b] = slot
        self.stats.prompt_tokens += P
        if slot.n_new <= 0:
            self._finish(b, "length")
            return False
        return True

    def _step(self) -> None:
        """One decode step over rows 0..n-1 (n: one past the last active row); free rows run a pad token at
        slot 0 of their own row, which the next request there overwrites."""
        for b, slot in enumerate(self.active):
            if slot is not None and slot.request.cancelled:
                self._finish(b, "cancelled")
        n = max((b + 1 for b, s in enumerate(self.active) if s is not None), default=0)
        if n == 0:
            return
        rows = self.active[:n]
        device = self.model.device
        token = torch.tensor([[s.token if s else self.pad] for s in rows], device=device)  # (n, 1)
        pos = torch.tensor([[s.pos if s else 0] for s in rows], device=device)  # (n, 1) each row's own slot
        if self.native is not None and self.native.takes_rows(n):
            logits = self.native(token, pos)  # (n, vocab)
        else:
            logits = decode_one_token(self.model, token, pos)  # (n, vocab)
        self.stats.steps += 1
        self.stats.step_rows += sum(s is not None for s in rows)
        for b, s in enumerate(rows):
            if s is not None:
                s.pos += 1
                self._advance(b, logits[b:b + 1])

    def _advance(self, b: int, logits: torch.Tensor) -> None:
        """Picks row b's next token from its logits (1, vocab), emits it, and ends the row when it is done."""
        slot = self.active[b]
        request, cfg = slot.request, slot.request.config
        if request.cancelled:
            self._finish(b, "cancelled")
            return
        if slot.seen is not None:
            logits = apply_repetition_penalty(logits, slot.seen, cfg.repetition_penalty)
        tok = int(sample(logits, cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, slot.generator)[0])
        if slot.seen is not None:
            slot.seen[0, tok] = True
        slot.produced += 1
        self.stats.completion_tokens += 1
        logprob = None
        if request.logprobs is not None:
            lp = logits[0].float().log_softmax(-1)  # (vocab,) of the model's distribution (before temperature)
            top = lp.topk(request.logprobs) if request.logprobs > 0 else None
            logprob = TokenLogprob(tok, float(lp[tok]),
                                   [] if top is None else list(zip(top.indices.tolist(), top.values.tolist())))
        row = slot.row
        stopped = accept_token(row, tok, slot.stops, cfg.stop_strings, slot.n_new)
        piece = unseen_text(row, slot.sent, cfg.stop_strings, final=row.done)
        slot.sent += len(piece)
        kept = tok not in slot.stops
        reason = ("stop" if stopped else "length") if row.done else None
        request.emit(Event(piece, tok if kept else None, logprob if kept else None, reason,
                           completion_tokens=slot.produced))
        if row.done:
            self.active[b] = None
        else:
            slot.token = tok

    def _finish(self, b: int, reason: str, error: str | None = None) -> None:
        slot = self.active[b]
        self.active[b] = None
        slot.request.emit(Event("", finish_reason=reason, error=error, completion_tokens=slot.produced))

    def _end_all(self) -> None:
        """At shutdown: every waiting and active request ends ("cancelled")."""
        with self._wake:
            waiting, self.waiting = list(self.waiting), deque()
        for request in waiting:
            request.emit(Event("", finish_reason="cancelled"))
        for b, slot in enumerate(self.active):
            if slot is not None:
                self._finish(b, "cancelled")


def _runs(admitted: list[tuple[int, Request]]) -> list[list[tuple[int, Request]]]:
    """[(row, request)] (rows ascending) cut into runs of consecutive rows."""
    runs: list[list[tuple[int, Request]]] = []
    for b, request in admitted:
        if runs and runs[-1][-1][0] == b - 1:
            runs[-1].append((b, request))
        else:
            runs.append([(b, request)])
    return runs
