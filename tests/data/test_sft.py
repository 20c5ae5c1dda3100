"""SFT data: answer-only labels through the chat template, truncation counts, bad lines, batches and packing."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.data import demo_tasks
from lmforge.data.demo import arithmetic
from lmforge.data.errors import DataError
from lmforge.data.labels import IGNORE
from lmforge.data.sft import SFTDataset, encode_chat, eval_prompts, load_sft, pack_rows, render_chat
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train.losses import next_token_loss
from tests.fixtures.smollm2 import SMOLLM2, needs_smollm2

ROOT = Path(__file__).resolve().parents[2]
WORDS = "the kettle holds litres of water and boils in four minutes what is how many 1.7 中文 答案 🙂".split()
SMOL_TEMPLATE = (  # SmolLM2-Instruct's: adds a default system prompt when the chat has none
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tok() -> Tokenizer:
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 30)))) for _ in range(200)]
    return train_tokenizer(docs, vocab_size=360)


def runs(ids: list[int] | torch.Tensor, labels: list[int] | torch.Tensor, tok: Tokenizer) -> list[str]:
    """The labelled tokens, decoded, one string per contiguous labelled run; checks labels == ids there."""
    ids, labels = list(map(int, ids)), list(map(int, labels))
    out, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == i
            cur.append(i)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    return out + ([tok.decode(cur)] if cur else [])


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return make_tok()


# ---------------------------------------------------------------- labels


MULTI = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "how many litres"},
    {"role": "assistant", "content": "1.7 litres 🙂"},
    {"role": "user", "content": "what is 答案"},
    {"role": "assistant", "content": " four minutes\n"},
    {"role": "user", "content": "and the water"},
    {"role": "assistant", "content": "boils"},
]


@pytest.mark.parametrize("system", [None, "You are a kettle expert."])
def test_single_turn_labels_are_answer_and_eos(tok: Tokenizer, system: str | None) -> None:
    prompt, answer = "how many litres of water", "1.7 litres 中文"
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    ids, labels = encode_chat(tok, msgs)
    assert ids == tok.apply_chat_template(msgs, tokenize=True)
    assert runs(ids, labels, tok) == [answer + tok.eos_token]
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    assert tok.decode(ids[:first]) == tok.apply_chat_template(msgs[:-1], add_generation_prompt=True)
    assert labels[-2] == tok.eos_id and labels[-1] == IGNORE and tok.decode(ids[-1:]) == "\n"  # not the newline


def test_multi_turn_labels_every_reply(tok: Tokenizer) -> None:
    ids, labels = encode_chat(tok, MULTI)
    answers = [m["content"] + tok.eos_token for m in MULTI if m["role"] == "assistant"]
    assert runs(ids, labels, tok) == answers
    assert sum(lab != IGNORE for lab in labels) == sum(len(tok.encode(a)) for a in answers)
    ids2, labels2 = encode_chat(tok, MULTI, first_labelled=4)  # preference prompts: earlier replies unlabelled
    assert ids2 == ids and runs(ids2, labels2, tok) == answers[1:]


def test_template_with_default_system_prompt(tok: Tokenizer) -> None:
    smol = Tokenizer(tok.backend, bos_token=None, eos_token="<|im_end|>", chat_template=SMOL_TEMPLATE)
    ids, labels = encode_chat(smol, MULTI[1:])
    assert "You are a helpful AI" in smol.decode(ids)
    assert runs(ids, labels, smol) == [m["content"] + "<|im_end|>" for m in MULTI[1:] if m["role"] == "assistant"]


def test_templates_that_cannot_be_labelled_raise(tok: Tokenizer) -> None:
    rewrites = (  # the last user turn is rendered differently from earlier ones: not prefix-consistent
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ('!' if loop.last else '') + '\n' + m['content']"
        " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    bad = Tokenizer(tok.backend, bos_token=None, eos_token="<|im_end|>", chat_template=rewrites)
    with pytest.raises(ValueError, match="prefix-consistent"):
        render_chat(bad, MULTI)
    no_eos = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    bad = Tokenizer(tok.backend, bos_token=None, eos_token="<|im_end|>", chat_template=no_eos)
    with pytest.raises(ValueError, match="eos_token"):
        render_chat(bad, MULTI)


@needs_smollm2
def test_smollm2_tokenizer_labels(tmp_path: Path) -> None:
    from lmforge.checkpoint.gguf import read_gguf

    g = read_gguf(SMOLLM2)  # type: ignore[arg-type]
    tc = g.tokenizer_config
    smol = Tokenizer(g.tokenizer, bos_token=tc.get("bos_token"), eos_token=tc["eos_token"],
                     pad_token=tc.get("pad_token"), chat_template=tc["chat_template"])
    assert smol.eos_token == "<|im_end|>"
    ids, labels = encode_chat(smol, MULTI[1:])
    assert runs(ids, labels, smol) == [m["content"] + "<|im_end|>" for m in MULTI[1:] if m["role"] == "assistant"]
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "What is 23+20?", "response": "43"}])
    (ex_ids, ex_labels), = load_sft(path, smol)[0]
    assert runs(ex_ids, ex_labels, smol) == ["43<|im_end|>"]


# ---------------------------------------------------------------- files: truncation, bad lines, eval prompts


def test_load_formats_and_truncation_counts(tok: Tokenizer, tmp_path: Path) -> None:
    long_answer = " ".join(["water"] * 40)
    records = [
        {"prompt": "how many litres", "response": "1.7 litres"},  # fits
        {"system": "be brief", "prompt": "what is", "response": long_answer},  # cut inside the answer
        {"prompt": " ".join(["kettle"] * 60), "response": "boils"},  # answer starts past max_len: dropped
        {"messages": MULTI},  # cut after its first answer: truncated
    ]
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    full, _ = load_sft(path, tok)
    assert len(full) == 4
    max_len = len(encode_chat(tok, MULTI[:3])[0]) + 4
    examples, stats = load_sft(path, tok, max_len=max_len)
    assert (stats.kept, stats.truncated, stats.dropped, stats.skipped, stats.lines) == (3, 2, 1, 0, 4)
    assert all(len(ids) <= max_len for ids, _ in examples)
    assert examples[0] == full[0]
    assert runs(*examples[1], tok)[0] in long_answer and runs(*examples[1], tok)[0] != long_answer
    assert runs(*examples[2], tok)[0] == MULTI[2]["content"] + tok.eos_token
    assert stats.tokens == sum(len(ids) for ids, _ in examples)
    assert stats.label_tokens == sum(lab != IGNORE for _, labels in examples for lab in labels[1:])
    assert stats.summary().startswith(f"{path}: 3 examples") and "2 truncated" in str(stats) and "1 dropped" in str(stats)
    assert f"max_len {max_len}" in str(stats)


BAD_LINES = [
    ('{"prompt": "hi", "response": "yo"', "malformed JSON"),
    ('["prompt", "response"]', "not a JSON object"),
    ('{"prompt": "hi"}', "missing 'response'"),
    ('{"response": "yo"}', "missing 'prompt'"),
    ('{"question": "hi", "answer": "yo"}', "need 'prompt' and 'response', or 'messages'"),
    ('{"prompt": "hi", "response": "  "}', "empty 'response'"),
    ('{"prompt": "hi", "response": 42}', "'response' is int"),
    ('{"prompt": ["hi"], "response": "yo"}', "prompt[0] is str"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}', "unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}', "empty assistant"),
    ('{"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "yo"}]}',
     "content is list, not a string"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]}', "missing 'content'"),
    ('{"messages": [{"role": "assistant", "content": "yo"}, {"role": "user", "content": "hi"}]}',
     "last message must be the assistant"),
    ('{"messages": []}', "non-empty list"),
]


@pytest.mark.parametrize("line,message", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_bad_line_names_file_and_line(tok: Tokenizer, tmp_path: Path, line: str, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "response": "yo"}, "", line])
    with pytest.raises(DataError, match=f"bad.jsonl:3: .*{re.escape(message)}"):
        load_sft(path, tok)


def test_skip_bad_lines_counts(tok: Tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "response": "yo"}, *(b for b, _ in BAD_LINES)])
    with open(path, "ab") as f:
        f.write(b'{"prompt": "\xff", "response": "x"}\n')  # invalid UTF-8
    examples, stats = load_sft(path, tok, skip_bad_lines=True)
    assert len(examples) == stats.kept == 1 and stats.skipped == len(BAD_LINES) + 1
    assert stats.skipped_examples[0].startswith(f"{path}:2: malformed JSON")
    assert "15 bad lines skipped" in stats.summary()
    with pytest.raises(DataError, match="no usable examples"):
        load_sft(write_jsonl(tmp_path / "all_bad.jsonl", [BAD_LINES[0][0]]), tok, skip_bad_lines=True)


def test_chat_the_template_rejects_is_a_bad_line(tok: Tokenizer, tmp_path: Path) -> None:
    no_system = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                 "{% endif %}" + tok.chat_template)
    strict = Tokenizer(tok.backend, bos_token=None, eos_token="<|im_end|>", chat_template=no_system)
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "hi", "response": "yo"},
                                              {"system": "be brief", "prompt": "hi", "response": "yo"}])
    with pytest.raises(DataError, match="s.jsonl:2: the chat template rejects this chat: System role not"):
        load_sft(path, strict)
    assert load_sft(path, strict, skip_bad_lines=True)[1].skipped == 1


def test_eval_prompts(tok: Tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "how many litres", "response": "1.7 litres"},
                                                {"messages": MULTI}])
    (p1, r1), (p2, r2) = eval_prompts(path, tok)
    assert r1 == "1.7 litres" and r2 == "boils"
    assert tok.decode(p1) == "<|im_start|>user\nhow many litres<|im_end|>\n<|im_start|>assistant\n"
    assert p2 == tok.apply_chat_template(MULTI[:-1], add_generation_prompt=True, tokenize=True)
    assert p2 == encode_chat(tok, MULTI)[0][:len(p2)]  # the same tokens training saw before the answer


# ---------------------------------------------------------------- batches


def make_examples(tok: Tokenizer, n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        q, a = (" ".join(rng.choice(WORDS, size=int(rng.integers(1, k)))) for k in (12, 8))
        out.append(encode_chat(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}]))
    return out


def rows_of(batch: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    """Rows of a right-padded batch without their padding (x, y), for comparing batches of different widths."""
    out = []
    for x, y in zip(batch["x"].tolist(), batch["y"].tolist()):
        n = max(i for i, v in enumerate(y) if v != IGNORE) + 1
        out.append((x[:n], y[:n]))
    return out


def test_batches_are_padded_shifted_and_deterministic(tok: Tokenizer) -> None:
    examples = make_examples(tok, 21)
    ds = SFTDataset(examples, tok.pad_id, seq_len=64)
    assert len(ds) == 21
    b = ds.batch(3, 4, seed=7)
    for k, v in ds.batch(3, 4, seed=7).items():
        assert torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k]
    assert not torch.equal(ds.batch(4, 4, seed=7)["x"], b["x"]) or not torch.equal(ds.batch(3, 4, seed=8)["x"], b["x"])
    assert b["x"].dtype == b["y"].dtype == torch.int64 and b["x"].shape == b["y"].shape
    assert "mask" not in b and b["n"] == int((b["y"] != IGNORE).sum())
    for row, i in enumerate(ds.order.indices(3, 4, 7)):
        ids, labels = examples[i]
        n = len(ids) - 1
        assert b["x"][row, :n].tolist() == ids[:-1] and b["y"][row, :n].tolist() == labels[1:]
        assert (b["x"][row, n:] == tok.pad_id).all() and (b["y"][row, n:] == IGNORE).all()
    assert b["x"].shape[1] == max(len(examples[i][0]) - 1 for i in ds.order.indices(3, 4, 7))
    # an epoch (21 rows, batches of 4 wrap into the next one) visits every row once
    seen = np.concatenate([ds.order.indices(s, 3, seed=1) for s in range(7)])
    assert sorted(seen.tolist()) == list(range(21))


def test_rank_slices_are_disjoint_and_complete(tok: Tokenizer) -> None:
    ds = SFTDataset(make_examples(tok, 30), tok.pad_id, seq_len=64)
    for step in (0, 5, 11):
        whole = ds.batch(step, 6, seed=3)
        parts = [ds.batch(step, 6, seed=3, rank=r, world_size=3) for r in range(3)]
        assert [r for p in parts for r in rows_of(p)] == rows_of(whole)
        assert sum(p["n"] for p in parts) == whole["n"]
    with pytest.raises(ValueError, match="divisible"):
        ds.batch(0, 5, world_size=2)
    ev = list(ds.eval_batches(8))
    assert [len(e["x"]) for e in ev] == [8, 8, 8, 6]
    assert [r for e in ev for r in rows_of(e)] == rows_of(ds._collate(range(30)))
    assert len(list(ds.eval_batches(8, rank=1, world_size=2))) == 3  # the last partial batch only on one rank


def test_too_long_example_is_refused(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="max_len <= 5"):
        SFTDataset([(list(range(10)), [IGNORE] * 10)], tok.pad_id, seq_len=4)


def test_pack_rows_best_fit() -> None:
    lengths = [5, 3, 8, 2, 7, 1, 4]
    rows = pack_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(7))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows) and len(rows) == 3  # 30 tokens in 3 rows of 10


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])  # RoPE, and learned positions (need position_ids)
def test_packed_batch_mask_positions_and_loss_equal_separate_runs(tok: Tokenizer, preset: str) -> None:
    examples = make_examples(tok, 24, seed=1)
    ds = SFTDataset(examples, tok.pad_id, seq_len=96, pack=True)
    assert len(ds) < 24 and sorted(i for r in ds.rows for i in r) == list(range(24))
    b = ds.batch(1, 3, seed=0)
    B, T = b["x"].shape
    assert b["mask"].shape == (B, 1, T, T) and b["mask"].dtype == torch.bool and b["position_ids"].shape == (B, T)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(preset)).float().eval()
    with torch.no_grad():
        packed, n = next_token_loss(model(b["x"], mask=b["mask"], position_ids=b["position_ids"]), b["y"])
    separate, n_sep = torch.zeros(()), 0
    for row, i in enumerate(ds.order.indices(1, 3, 0)):
        t = 0
        for e in ds.rows[i]:
            ids, labels = examples[e]
            m = len(ids) - 1
            assert b["position_ids"][row, t:t + m].tolist() == list(range(m))
            block = b["mask"][row, 0, t:t + m]  # (m, T): causal inside the example, nothing outside it
            assert torch.equal(block[:, t:t + m], torch.ones(m, m, dtype=torch.bool).tril())
            assert not block[:, :t].any() and not block[:, t + m:].any()
            assert b["x"][row, t:t + m].tolist() == ids[:-1] and b["y"][row, t:t + m].tolist() == labels[1:]
            with torch.no_grad():
                loss, k = next_token_loss(model(torch.tensor([ids[:-1]])), torch.tensor([labels[1:]]))
            separate, n_sep, t = separate + loss, n_sep + k, t + m
        assert (b["y"][row, t:] == IGNORE).all() and b["mask"][row, 0, t:].any(-1).all()  # no all-masked query
    assert n == n_sep == b["n"]
    torch.testing.assert_close(packed, separate)
    assert b["tokens"] == sum(len(examples[e][0]) - 1 for i in ds.order.indices(1, 3, 0) for e in ds.rows[i])


# ---------------------------------------------------------------- example data


def test_demo_sft_pairs(tok: Tokenizer) -> None:
    train, val = demo_tasks.sft_pairs(300, seed=1), demo_tasks.sft_pairs(100, seed=1, split="val")
    assert train == demo_tasks.sft_pairs(300, seed=1) and train != demo_tasks.sft_pairs(300, seed=2)

    def key(r: dict[str, str]) -> tuple[str, str, str]:
        q = r["prompt"].removeprefix("帮我计算").removeprefix("What is ").split("的")[0].rstrip("?=")
        op = "+" if "+" in q else "-"
        a, b = q.split(op)
        assert r["response"] in (str(arithmetic(int(a), int(b), op)), f"等于{arithmetic(int(a), int(b), op)}")
        return a, b, op

    assert not {key(r) for r in train} & {key(r) for r in val}
    assert {"帮我计算", "What is", "="} <= {p for r in train for p in ("帮我计算", "What is", "=") if p in r["prompt"]}


def test_product_manual_example_data(tok: Tokenizer) -> None:
    folder = ROOT / "examples" / "product_manual"
    spec = importlib.util.spec_from_file_location("make_data", folder / "make_data.py")
    assert spec is not None and spec.loader is not None
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    for name, records in make_data.make().items():  # the committed files are what the generator writes
        assert [json.loads(x) for x in (folder / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()] == records
    train, stats = load_sft(folder / "train.jsonl", tok)
    assert 300 <= stats.kept <= 400 and stats.skipped == 0
    val = eval_prompts(folder / "val.jsonl", tok)
    assert 40 <= len(val) <= 60 and all(len(ref) <= 40 for _, ref in val)
    train_prompts = {json.loads(x)["prompt"] for x in (folder / "train.jsonl").read_text().splitlines()}
    assert not train_prompts & {json.loads(x)["prompt"] for x in (folder / "val.jsonl").read_text().splitlines()}
    assert sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) < 200_000
