"""Continuous batching without HTTP: per-row KV-cache positions are exact (every family), and requests that
join and leave a running batch get the tokens and text `generate` gives each alone; cancel, queue limits,
seeds, stop strings, log-probabilities."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import lmforge
from lmforge.generate import GenerationConfig, decode_one_token, generate, prefill, stream
from lmforge.kernels import build
from lmforge.serve.batcher import Batcher, Event, QueueFull, Request
from lmforge.tokenizer import train_tokenizer
from tests.fixtures.hf_models import FAMILIES, VOCAB, hf_model

TEXTS = ["The cat sat on the mat.", "A dog ran in the park.", "Numbers: 12345 and 678.", "A longer document " * 6]


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_of_different_lengths_decode_as_each_alone(family, tmp_path):
    """Rows of one cache hold sequences of different lengths: each row is prefilled on its own (cache_rows),
    then every step decodes all rows at once at each row's own slot (a free row idles at slot 0). Each row's
    logits equal a full forward of its sequence (RoPE, learned positions, ALiBi, sliding windows)."""
    hf_model(family).save_pretrained(tmp_path)
    model, _ = lmforge.load(tmp_path, device="cpu")
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (14, 9)]
    starts = [7, 3]  # prompt lengths; row 1 joins two steps after row 0 started decoding
    with torch.no_grad():
        model.setup_cache(3, 24)
        got: list[list[torch.Tensor]] = [[prefill(model, torch.tensor([seqs[0][:7]]), cache_rows=slice(0, 1))[0]], []]
        pos = [7, 0]
        for step in range(6):
            if step == 2:
                got[1].append(prefill(model, torch.tensor([seqs[1][:3]]), cache_rows=slice(1, 2))[0])
                pos[1] = 3
            active = [0] + ([1] if step >= 2 else [])
            token = torch.tensor([[seqs[b][pos[b]] if b in active else 0] for b in range(3)])  # (3, 1)
            slots = torch.tensor([[pos[b] if b in active else 0] for b in range(3)])  # (3, 1)
            logits = decode_one_token(model, token, slots)
            for b in active:
                got[b].append(logits[b])
                pos[b] += 1
        model.clear_cache()
        for b, (s, start) in enumerate(zip(seqs, starts)):
            full = model(torch.tensor([s[: start + len(got[b]) - 1]]))[0]  # (T, vocab)
            torch.testing.assert_close(torch.stack(got[b]), full[start - 1:], atol=1e-4, rtol=1e-4)


# ---- the batcher -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    tok = train_tokenizer(TEXTS * 3, 300)
    torch.manual_seed(0)
    config = lmforge.ModelConfig.from_preset("tiny-llama", vocab_size=tok.vocab_size, max_seq_len=64, init_std=0.2)
    return lmforge.Transformer(config).eval(), tok


class Collect:
    """A request's events, with a flag set when the last one arrives."""

    def __init__(self) -> None:
        self.request: Request | None = None
        self.on_token = None  # called on the batcher's thread after each token
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.token is not None and self.on_token is not None:
            self.on_token()
        if event.finish_reason is not None:
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [e.token for e in self.events if e.token is not None]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def reason(self) -> str | None:
        return self.events[-1].finish_reason if self.events else None


def _submit(batcher: Batcher, prompt, **options) -> Collect:
    out = Collect()
    logprobs, ignore_eos = options.pop("logprobs", None), options.pop("ignore_eos", False)
    out.request = Request(prompt, GenerationConfig(**options), out, logprobs=logprobs, ignore_eos=ignore_eos)
    batcher.submit(out.request)
    return out


@pytest.fixture
def batcher(tiny):
    model, tok = tiny
    b = Batcher(model, tok, slots=3, context=64, max_waiting=4)
    b.start()
    yield b
    b.stop()
    model.clear_cache()


def test_joining_and_leaving_requests_get_the_tokens_each_gets_alone(tiny, batcher):
    model, tok = tiny
    prompts = [tok.encode(t) for t in ("The cat", "A dog ran in", "Numbers: 1", "A longer", "the", "park.")]
    lengths = [20, 5, 12, 30, 3, 16]
    outs = [_submit(batcher, p, max_new_tokens=n) for p, n in zip(prompts[:2], lengths[:2])]
    assert outs[1].done.wait(60)  # the short one ended; the others join a batch that is running
    outs += [_submit(batcher, p, max_new_tokens=n) for p, n in zip(prompts[2:], lengths[2:])]  # 5 > 3 slots: 1 waits
    assert all(o.done.wait(60) for o in outs)
    for o, p, n in zip(outs, prompts, lengths):
        assert o.tokens == generate(model, p, n, tokenizer=tok)[0]
        assert o.text == "".join(stream(model, tok, p, n))
        assert o.reason == ("length" if len(o.tokens) == n else "stop")
        assert o.events[-1].completion_tokens == len(o.tokens) + (o.reason == "stop")


def test_stop_strings_seeds_and_logprobs(tiny, batcher):
    model, tok = tiny
    p = tok.encode("The cat")
    free = _submit(batcher, p, max_new_tokens=20)
    assert free.done.wait(60)
    cut = free.text[3:6]
    stopped = _submit(batcher, p, max_new_tokens=20, stop_strings=[cut])
    a, b, c = (_submit(batcher, p, max_new_tokens=12, temperature=1.0, seed=s) for s in (7, 7, 8))
    assert all(o.done.wait(60) for o in (stopped, a, b, c))
    assert stopped.text == free.text[: free.text.index(cut)] and stopped.reason == "stop"
    assert a.tokens == b.tokens != c.tokens  # seeded: the same whatever else is in the batch
    lp = _submit(batcher, p, max_new_tokens=4, logprobs=3)
    assert lp.done.wait(60)
    plain = copy.deepcopy(model)  # the batcher holds the model's cache
    plain.clear_cache()
    with torch.no_grad():
        logits = plain(torch.tensor([p + lp.tokens]))[0, len(p) - 1:-1].log_softmax(-1)  # (4, vocab)
    for e, row in zip([e for e in lp.events if e.token is not None], logits):
        assert e.logprob.logprob == pytest.approx(float(row[e.token]), abs=1e-4)
        assert [t for t, _ in e.logprob.top] == row.topk(3).indices.tolist()


def test_cancel_frees_the_slot_and_a_full_queue_refuses(tiny):
    """Before the loop starts, 4 requests fill the waiting line and a 5th is refused. Then one is cancelled
    while it waits (never run), one cancels after its first token (ends at the next step), and the others
    get the tokens they get alone."""
    model, tok = tiny
    batcher = Batcher(model, tok, slots=2, context=64, max_waiting=2)
    p = tok.encode("A dog")
    first, waits, rest, short = (_submit(batcher, p, max_new_tokens=n) for n in (60, 60, 30, 2))
    with pytest.raises(QueueFull, match="0 of 2 slots are busy and 4 requests wait"):  # 2 free + 2 waiting
        _submit(batcher, p, max_new_tokens=2)
    batcher.cancel(waits.request)
    first.on_token = lambda: batcher.cancel(first.request)
    batcher.start()
    try:
        assert all(o.done.wait(60) for o in (first, waits, rest, short))
    finally:
        batcher.stop()
        model.clear_cache()
    assert (first.reason, len(first.tokens)) == ("cancelled", 1)
    assert (waits.reason, waits.tokens) == ("cancelled", [])
    assert rest.tokens == generate(model, p, 30, tokenizer=tok)[0]
    assert short.tokens == generate(model, p, 2, tokenizer=tok)[0]
    assert batcher.busy == 0 and batcher.queue_depth == 0


def test_prompts_that_do_not_fit_are_refused_by_length(tiny, batcher):
    with pytest.raises(ValueError, match="70 tokens but the context is 64"):
        batcher.submit(Request([1] * 70, GenerationConfig(), Collect()))
    out = _submit(batcher, [1] * 60, max_new_tokens=50)  # only 4 more fit
    assert out.done.wait(60) and out.reason in ("length", "stop") and len(out.tokens) <= 4


class EosAt:
    """`tokenizer` with another eos id."""

    def __init__(self, tokenizer, eos_id: int) -> None:
        self.tokenizer, self.eos_id = tokenizer, eos_id

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_ignore_eos_goes_on_to_max_tokens(tiny):
    model, tok = tiny
    p = tok.encode("The cat")
    free = generate(model, p, 12, tokenizer=tok)[0]
    eos = EosAt(tok, free[5])
    batcher = Batcher(model, eos, slots=2, context=64)
    batcher.start()
    try:
        stopped, full = (_submit(batcher, p, max_new_tokens=12, ignore_eos=i == 1) for i in range(2))
        assert stopped.done.wait(60) and full.done.wait(60)
    finally:
        batcher.stop()
        model.clear_cache()
    assert (stopped.tokens, stopped.reason) == (free[: free.index(free[5])], "stop")
    assert (full.tokens, full.reason) == (free, "length")


def test_requests_that_arrive_together_are_prefilled_together(tiny):
    """Prompts of different lengths admitted at one turn take consecutive rows and one right-padded prefill;
    each still gets the tokens it gets alone."""
    model, tok = tiny
    forward, prefills = model.forward, []

    def counted(ids, *args, **kwargs):
        if ids.shape[1] > 1:
            prefills.append(tuple(ids.shape))
        return forward(ids, *args, **kwargs)

    prompts = [tok.encode(t) for t in ("The cat sat on", "A dog", "Numbers: 12345 and", "park")]
    model.forward = counted
    batcher = Batcher(model, tok, slots=4, context=64)
    try:
        outs = [Collect() for _ in prompts]
        for o, p in zip(outs, prompts):
            o.request = Request(p, GenerationConfig(max_new_tokens=12), o)
        batcher.submit_all([o.request for o in outs])  # queued before the loop starts: one turn admits all
        batcher.start()
        assert all(o.done.wait(60) for o in outs)
    finally:
        batcher.stop()
        del model.forward
        model.clear_cache()
    assert prefills == [(4, max(map(len, prompts)))]
    for o, p in zip(outs, prompts):
        assert o.tokens == generate(model, p, 12, tokenizer=tok)[0]


def test_a_failing_prefill_or_step_ends_those_requests_with_an_error_and_the_loop_goes_on(tiny):
    model, tok = tiny
    forward = model.forward
    fail = {"prompt": 7, "step": False}

    def flaky(ids, *args, **kwargs):
        if ids.shape[1] == fail["prompt"] or (ids.shape[1] == 1 and fail["step"]):
            raise RuntimeError("simulated")
        return forward(ids, *args, **kwargs)

    model.forward = flaky
    batcher = Batcher(model, tok, slots=2, context=64)
    batcher.start()
    try:
        bad = _submit(batcher, list(range(3, 10)), max_new_tokens=5)  # 7 tokens: its prefill fails
        assert bad.done.wait(60) and bad.reason == "error" and "RuntimeError" in bad.events[-1].error
        good = _submit(batcher, [3, 4, 5], max_new_tokens=5)
        assert good.done.wait(60) and good.reason in ("length", "stop")
        fail["step"] = True
        broken = _submit(batcher, [3, 4, 5], max_new_tokens=5)  # its first token, then the step fails
        assert broken.done.wait(60) and broken.reason == "error" and len(broken.tokens) == 1
        fail["step"] = False
        again = _submit(batcher, [3, 4, 5], max_new_tokens=5)
        assert again.done.wait(60) and again.tokens == good.tokens
    finally:
        batcher.stop()
        del model.forward
        model.clear_cache()


@pytest.mark.parametrize("weights", ["int8", "bfloat16"])
def test_a_quantized_or_bf16_model_batches_as_it_generates_alone(tiny, weights):
    """`serve --quantize int8` swaps the linears (lmforge.quantize), `--dtype bfloat16` halves the weights (both
    decoded by the C++ step where it covers the model); rows decoded together still get the tokens the model
    gives each prompt alone."""
    from lmforge.quantize import quantize

    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    model.clear_cache()
    if weights == "int8":
        quantize(model, "int8")
    else:
        model.to(torch.bfloat16)
    batcher = Batcher(model, tok, slots=3, context=64)
    assert batcher.native is not None or not build.kernels_allowed()  # the C++ step decodes
    prompts = [tok.encode(t) for t in ("The cat", "A dog ran in", "Numbers: 1", "park.")]
    batcher.start()
    try:
        outs = [_submit(batcher, p, max_new_tokens=10) for p in prompts]
        assert all(o.done.wait(60) for o in outs)
    finally:
        batcher.stop()
        model.clear_cache()
    assert [o.tokens for o in outs] == [generate(model, p, 10, tokenizer=tok)[0] for p in prompts]
