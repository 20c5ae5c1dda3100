"""Autoregressive generation with a static KV cache: prefill the prompt once, then decode one token at a time.

Small functions, so `torch.compile` wraps only the hot step (`decode_one_token`), as in gpt-fast. Batches of
prompts are left-padded: pad keys are masked out and every row gets its own positions, so greedy output of a
batch equals generating each prompt alone.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.kernels import accelerate
from lmforge.kernels.step import NativeStep, native_step
from lmforge.model import Transformer
from lmforge.utils import placement_errors


@dataclass
class GenerationConfig:
    """How to pick tokens and when to stop. temperature=0 is greedy; top_k / top_p / min_p filter sampling."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output (CTRL)
    seed: int | None = None  # seeds a private torch.Generator: same seed, same samples
    stop_ids: Sequence[int] = ()  # extra to the tokenizer's eos
    stop_strings: Sequence[str] = ()  # needs a tokenizer
    compile: bool = False  # torch.compile the decode step (CUDA graphs: fixed shapes; CPU: dynamic in length)

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k is None or self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}"),
            (self.top_p is None or 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.min_p is None or 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (all(self.stop_strings), "stop_strings must not contain an empty string"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        self.stop_ids, self.stop_strings = tuple(self.stop_ids), tuple(self.stop_strings)


# ---- the steps ---------------------------------------------------------------------------------------------


def prefill(model: Transformer, ids: torch.Tensor, offsets: torch.Tensor | None = None,
            cache_rows: slice | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Runs the prompt (B, P) through the model once, filling the KV cache; returns the last logits (B, vocab).

    offsets: (B, 1) left-pad counts. Pad keys are masked out and positions start at 0 at each row's first real
    token; a pad query sees only itself, so no attention row is empty (which would give NaN). cache_rows: the
    cache rows to fill (default the first B; a server fills a free row while the others keep theirs).
    lengths: (B,) the real lengths of right-padded rows (a server's prompts prefilled together): each row's
    logits are those at its last real token; the pads after it never touch its real tokens (causal) and fill
    cache slots that its own next tokens overwrite."""
    B, P = ids.shape
    positions = torch.arange(P, device=ids.device)  # (P,) cache slots
    mask = position_ids = None
    if offsets is not None:
        real = positions >= offsets  # (B, P)
        causal = positions[:, None] >= positions  # (P, P)
        mask = ((causal & real[:, None, :]) | torch.eye(P, dtype=torch.bool, device=ids.device))[:, None]
        position_ids = (positions - offsets).clamp(min=0)  # (B, P)
    last = torch.zeros(B, P, dtype=torch.bool, device=ids.device)
    if lengths is None:
        last[:, -1] = True  # the LM head only at the last position: not (B, P, vocab) logits for a long prompt
    else:
        last[torch.arange(B, device=ids.device), lengths.to(ids.device) - 1] = True
    if cache_rows is not None:  # a plain model call otherwise: stand-ins (tests) need not take the argument
        return model(ids, positions=positions, mask=mask, position_ids=position_ids, logits_at=last,
                     cache_rows=cache_rows).float()  # (B, vocab)
    return model(ids, positions=positions, mask=mask, position_ids=position_ids, logits_at=last).float()  # (B, vocab)


def decode_one_token(model: Transformer, token: torch.Tensor, pos: torch.Tensor,
                     key_valid: torch.Tensor | None = None, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """One step: `token` (B, 1) at cache slot `pos` (1,) -> next-token logits (B, vocab) in fp32. `pos` may be
    (B, 1), each row's own slot (rows holding sequences of different lengths: a server's continuous batch).

    key_valid: (B, S) False at pad slots; S is the filled length (eager, and compiled on CPU: one graph with S
    dynamic) or the whole cache (CUDA graphs need fixed shapes). offsets: (B, 1) left-pad counts, so row b
    sits at position pos - offsets[b]."""
    mask = position_ids = None
    if key_valid is not None:
        slots = torch.arange(key_valid.shape[1], device=key_valid.device)  # (S,)
        mask = (key_valid & (slots <= pos))[:, None, None]  # (B, 1, 1, S)
    if offsets is not None:
        position_ids = pos - offsets  # (B, 1)
    return model(token, positions=pos, mask=mask, position_ids=position_ids)[:, -1].float()


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (as in `transformers`): logits of `seen` (B, vocab) tokens are divided by `penalty`
    when positive and multiplied when negative."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           min_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, vocab): argmax when temperature is 0; else softmax(logits / T)
    restricted to the top_k tokens, the smallest set with mass >= top_p, and tokens with p >= min_p * p_max."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)  # (B, vocab)
    if min_p is not None and min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


_COMPILED: dict[str, Callable[..., torch.Tensor]] = {}


def _compiled_step(device: torch.device) -> Callable[..., torch.Tensor]:
    """decode_one_token under torch.compile, once per device type: CUDA graphs on CUDA; on CPU a C++ wrapper
    around the kernels (a step is ~200 small kernels, and Python calling each one is a visible share of a step)."""
    if device.type not in _COMPILED:
        if device.type == "cuda":
            _COMPILED[device.type] = torch.compile(decode_one_token, mode="reduce-overhead")
        else:
            # no size/alignment asserts on the ~500 inputs of each call: the first call of a generate() checks every guard
            _COMPILED[device.type] = torch.compile(decode_one_token, options={
                "cpp_wrapper": device.type == "cpu", "size_asserts": False, "alignment_asserts": False})
    return _COMPILED[device.type]


def make_step(model: Transformer, compile: bool, key_valid: torch.Tensor, offsets: torch.Tensor | None,
              prompt_len: int, native: NativeStep | None = None) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """The decode step of one generate() call: step(token (B, 1), pos (1,), t) -> logits (B, vocab), t the
    steps taken before. key_valid (B, L) is False at pad slots; offsets (B, 1) the left-pad counts (None: no
    padding). With `native` (`kernels.step.native_step`: a LLaMA-family CPU model, fp32 quantized or bf16 / fp16) the whole
    step is one C++ call, compile or not; otherwise eager, the step attends to the filled slots; compiled, to the
    whole cache with CUDA graphs (fixed shapes) or to the filled slots with a dynamic length on CPU (one graph)."""
    if native is not None:  # a covered CPU model: the whole step in one C++ call (kernels/step.py)
        return lambda token, pos, t: native(token, pos, None if offsets is None else key_valid, offsets)
    if not compile:
        if offsets is None:
            return lambda token, pos, t: decode_one_token(model, token, pos)
        return lambda token, pos, t: decode_one_token(model, token, pos, key_valid[:, : prompt_len + t + 1], offsets)
    compiled = _compiled_step(key_valid.device)

    def step(token: torch.Tensor, pos: torch.Tensor, t: int) -> torch.Tensor:
        valid = key_valid  # CUDA graphs need fixed shapes: the whole cache
        if valid.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        elif valid.device.type == "cpu":  # one graph, dynamic in the number of filled slots
            valid = key_valid[:, : prompt_len + t + 1]
            torch._dynamo.maybe_mark_dynamic(valid, 1)
        with _known_shapes() if t > 0 else contextlib.nullcontext():
            return compiled(model, token, pos, valid, offsets)

    return step


def _known_shapes() -> Any:
    """Context for the compiled step's calls after the first of a generate() call: the same graph runs (same
    batch, cache, dtypes; only values change), so dynamo skips re-checking its ~300 tensor guards (parameters,
    caches) on every token (figures: README, benchmarks/decode.py). The first call of each generate()
    checks them all (and compiles anew when shapes changed). The stance is process-wide, like the model's KV
    cache: one generate() at a time per process."""
    try:
        return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
    except TypeError:  # a torch without the option
        return contextlib.nullcontext()


# ---- text ----------------------------------------------------------------------------------------------------


class TextStream:
    """Incremental detokenizer: `push` ids one at a time, get text pieces that never end inside a UTF-8
    character. Decodes a short window of ids with the previous ones as context (as TGI / vLLM do), so
    byte-level pieces and SentencePiece's leading spaces come out right; a piece ending in U+FFFD (an
    incomplete character) is held back until the next id completes it."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] were already emitted and serve as context

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        """What is still held back (an incomplete character comes out as U+FFFD)."""
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):]


def safe_end(text: str, stop_strings: Sequence[str]) -> int:
    """Length of `text` that can be shown: a tail that may be the start of a stop string is held back."""
    end = len(text)
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                end = min(end, len(text) - k)
                break
    return end


# ---- the loop ------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One sequence's output so far (generation's and a server's)."""

    ids: list[int] = field(default_factory=list)  # new tokens, without a final stop id
    decoder: TextStream | None = None
    text: str = ""
    stop_at: int | None = None  # where a stop string starts in `text`
    done: bool = False


def stop_ids(tokenizer: Any, extra: Sequence[int] = ()) -> set[int]:
    """The ids that end a reply: `extra`, the tokenizer's eos and its other stop ids (e.g. end of turn)."""
    stops = set(extra)
    if tokenizer is not None:
        stops |= {tokenizer.eos_id, *getattr(tokenizer, "stop_ids", ())} - {None}
    return stops


def unseen_text(row: Row, sent: int, stop_strings: Sequence[str], final: bool = False) -> str:
    """The part of `row.text` after the `sent` characters already shown that can be shown now: never a stop
    string or the start of one. `final` (the row is done): also what the decoder still holds back and a
    partial stop string."""
    if final and row.stop_at is None and row.decoder is not None:
        row.text += row.decoder.flush()
        return row.text[sent:]
    end = row.stop_at if row.stop_at is not None else safe_end(row.text, stop_strings)
    return row.text[sent:end] if end > sent else ""


def _cache_len(model: Transformer, batch: int, need: int, compiled: bool) -> tuple[int, bool]:
    """Length of the cache to use and whether generation sets it up (and clears it after). A cache the
    caller set up (`model.setup_cache`) is reused when large enough: keeps compiled steps' buffers fixed."""
    have = model.cache_len
    if have is not None and have >= need and model.cache_batch >= batch:
        return have, False
    if compiled:  # few distinct shapes -> few recompiles
        need = min(model.config.max_seq_len, -(-need // 256) * 256)
    return need, True


@torch.inference_mode()
def _run(model: Transformer, prompts: Sequence[Sequence[int]], cfg: GenerationConfig, tokenizer: Any,
         with_text: bool) -> Iterator[list[Row]]:
    """The decoding loop; yields the rows after each new token until every row is done."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if cfg.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer")
    B, P, limit = len(prompts), max(len(p) for p in prompts), model.config.max_seq_len
    if P > limit:
        raise ValueError(f"the prompt has {P} tokens but the model's context is {limit} tokens")
    total = min(limit, P + cfg.max_new_tokens)  # prompt + new tokens never exceed the context
    n_new = total - P
    rows = [Row(decoder=TextStream(tokenizer) if with_text else None) for _ in prompts]
    if n_new == 0:
        return
    stops = stop_ids(tokenizer, cfg.stop_ids)
    pad = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id is not None else 0
    device = model.device
    accelerate(model, training=False)  # the fast modules (a no-op after the first call but for the plan)
    pads = [P - len(p) for p in prompts]
    padded = any(pads)
    ids = torch.tensor([[pad] * n + list(p) for n, p in zip(pads, prompts)], device=device)  # (B, P)
    offsets = torch.tensor(pads, device=device)[:, None]  # (B, 1)
    L, owns_cache = _cache_len(model, B, total, cfg.compile)
    if owns_cache:
        model.setup_cache(B, L)
    key_valid = torch.arange(L, device=device) >= offsets  # (B, L): False at pad slots
    native = native_step(model, B) if device.type == "cpu" else None
    native = native if native is not None and native.takes_rows(B) else None
    step = make_step(model, cfg.compile, key_valid, offsets if padded else None, P, native)
    generator = None if cfg.seed is None else torch.Generator(device=device).manual_seed(cfg.seed)
    seen = None

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
        return sample(logits, cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, generator)  # (B,)

    with placement_errors(model):  # a device/dtype mix-up named in one line
        try:
            if native is not None and native.takes_prompt(B * P):  # a short prompt: the C++ step too
                logits = native.prefill(ids, offsets if padded else None, key_valid if padded else None)
            else:
                logits = prefill(model, ids, offsets if padded else None)  # (B, vocab)
            if cfg.repetition_penalty != 1.0:
                seen = torch.zeros_like(logits, dtype=torch.bool)  # (B, vocab)
                for b, p in enumerate(prompts):
                    seen[b, torch.tensor(list(p), device=device)] = True
            token = pick(logits)
            pos = torch.tensor([P], device=device)  # (1,) the slot `token` goes to
            done_mask = None
            for t in range(n_new):
                ready = _to_host(token)
                if t + 1 < n_new:  # queue the next step before the host looks at this token (overlap on GPU)
                    if seen is not None:
                        seen.scatter_(1, token[:, None], True)
                    if done_mask is not None:  # finished rows go on with pad; their output is already cut
                        token = token.masked_fill(done_mask, pad)
                    logits = step(token[:, None], pos, t)
                    pos += 1
                    token = pick(logits)
                newly_done = False
                for row, tok in zip(rows, ready()):
                    if not row.done:
                        newly_done |= accept_token(row, tok, stops, cfg.stop_strings, n_new)
                yield rows
                if all(r.done for r in rows):
                    break
                if newly_done:
                    done_mask = torch.tensor([r.done for r in rows], device=device)
        finally:
            if owns_cache:
                model.clear_cache()


def _to_host(token: torch.Tensor) -> Callable[[], list[int]]:
    """Starts copying `token` to the host; the returned function waits for it (and only it) on CUDA."""
    if token.device.type != "cuda":
        return token.tolist
    host = token.to("cpu", non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> list[int]:
        copied.synchronize()
        return host.tolist()

    return wait


def accept_token(row: Row, tok: int, stops: set[int], stop_strings: Sequence[str], n_new: int) -> bool:
    """Adds `tok` to a row that is not done; True when the row stops by a stop id or stop string."""
    if tok in stops:
        row.done = True
        return True
    row.ids.append(tok)
    if row.decoder is not None:
        piece = row.decoder.push(tok)
        start = max(0, len(row.text) - max((len(s) for s in stop_strings), default=0) + 1)
        row.text += piece
        found = [i for s in stop_strings if (i := row.text.find(s, start)) >= 0]
        if found:
            row.stop_at = min(found)
            row.done = True
            return True
    row.done = len(row.ids) == n_new
    return False


def generate(model: Transformer, prompt_ids: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
             max_new_tokens: int = 256, *, tokenizer: Any = None, **options: Any) -> list[list[int]]:
    """New tokens for each prompt (one prompt of ids, a batch of them, or a (B, T) tensor): a list of lists.
    `options`: the other `GenerationConfig` fields (temperature, top_k, top_p, min_p, repetition_penalty,
    seed, stop_ids, stop_strings, compile).

    Stops a row at the tokenizer's eos or any `stop_ids` (the stop id is not returned), after the token that
    completes a stop string (returned), after `max_new_tokens`, or when prompt + output fills the context."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, **options)
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    prompts = [prompt_ids] if prompt_ids and isinstance(prompt_ids[0], int) else prompt_ids
    last = deque(_run(model, prompts, cfg, tokenizer, with_text=bool(cfg.stop_strings)), maxlen=1)
    return [list(r.ids) for r in last[0]] if last else [[] for _ in prompts]


def stream(model: Transformer, tokenizer: Any, prompt: str | Sequence[int], max_new_tokens: int = 256,
           **options: Any) -> Iterator[str]:
    """Yields the reply to one prompt (text, or ids) as text pieces while it is generated. Pieces never split a
    UTF-8 character, and never show a stop string or the start of one. `options`: GenerationConfig fields."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, **options)
    sent, row = 0, None
    for rows in _run(model, [ids], cfg, tokenizer, with_text=True):
        row = rows[0]
        if piece := unseen_text(row, sent, cfg.stop_strings):
            yield piece
            sent += len(piece)
    if row is not None and (piece := unseen_text(row, sent, cfg.stop_strings, final=True)):
        yield piece  # what the decoder still holds back, and any partial stop
