"""Preference data: answer-only labels after the prompt, bad records, chosen-then-rejected batches."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lmforge.data import demo_tasks
from lmforge.data.demo import arithmetic
from lmforge.data.errors import DataError
from lmforge.data.labels import IGNORE
from lmforge.data.preference import PreferenceDataset, load_preferences
from lmforge.data.sft import encode_chat
from lmforge.tokenizer import Tokenizer
from tests.data.test_sft import ROOT, make_tok, runs, write_jsonl

HISTORY = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "how many litres"},
    {"role": "assistant", "content": "1.7 litres"},
    {"role": "user", "content": "and the water boils in"},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return make_tok()


def test_string_records_label_only_the_answers(tok: Tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "how many litres", "chosen": "1.7 litres", "rejected": "2.0 litres"},
        {"system": "be brief", "prompt": "what is", "chosen": "four minutes", "rejected": "the kettle 🙂"},
    ])
    pairs, stats = load_preferences(path, tok)
    assert stats.kept == 2 and stats.unit == "pairs"
    (c, r), (c2, r2) = pairs
    assert runs(*c, tok) == ["1.7 litres<|im_end|>"] and runs(*r, tok) == ["2.0 litres<|im_end|>"]
    assert runs(*c2, tok) == ["four minutes<|im_end|>"] and runs(*r2, tok) == ["the kettle 🙂<|im_end|>"]
    assert tok.decode(c2[0]).startswith("<|im_start|>system\nbe brief<|im_end|>")
    msgs = [{"role": "user", "content": "how many litres"}, {"role": "assistant", "content": "1.7 litres"}]
    assert c == encode_chat(tok, msgs)  # the SFT labelling


def test_multi_turn_prompt_and_answers(tok: Tokenizer, tmp_path: Path) -> None:
    chosen = [{"role": "assistant", "content": "four minutes"}, {"role": "user", "content": "sure?"},
              {"role": "assistant", "content": "yes"}]
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": HISTORY, "chosen": "four minutes", "rejected": "what is"},
        {"prompt": HISTORY, "chosen": chosen, "rejected": [{"role": "assistant", "content": "an hour"}]},
    ])
    (c, r), (c2, r2) = load_preferences(path, tok)[0]
    assert runs(*c, tok) == ["four minutes<|im_end|>"]  # the assistant turn inside the prompt is not labelled
    assert runs(*r, tok) == ["what is<|im_end|>"]
    assert "1.7 litres" in tok.decode(c[0])
    assert runs(*c2, tok) == ["four minutes<|im_end|>", "yes<|im_end|>"] and runs(*r2, tok) == ["an hour<|im_end|>"]


BAD = [
    ('{"prompt": "hi", "chosen": "a", "rejected": "a"}', "'chosen' and 'rejected' are the same answer"),
    ('{"prompt": "hi", "chosen": [{"role": "assistant", "content": "a"}], "rejected": '
     '[{"role": "assistant", "content": "a"}]}', "the same answer"),
    ('{"prompt": "hi", "chosen": "a"}', "missing 'rejected'"),
    ('{"chosen": "a", "rejected": "b"}', "missing 'prompt'"),
    ('{"prompt": "hi", "chosen": "", "rejected": "b"}', "empty 'chosen'"),
    ('{"prompt": "hi", "chosen": "a", "rejected": 3}', "'rejected' is int"),
    ('{"prompt": 3, "chosen": "a", "rejected": "b"}', "'prompt' is int"),
    ('{"prompt": "hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}', "must end with an assistant"),
    ('{"prompt": [{"role": "robot", "content": "hi"}], "chosen": "a", "rejected": "b"}', "unknown role 'robot'"),
    ('{"prompt": "hi", "chosen": "a", "rejected": "b"', "malformed JSON"),
]


@pytest.mark.parametrize("line,message", BAD, ids=[m for _, m in BAD])
def test_bad_records(tok: Tokenizer, tmp_path: Path, line: str, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "chosen": "a", "rejected": "b"}, line])
    with pytest.raises(DataError, match=f"bad.jsonl:2: .*{re.escape(message)}"):
        load_preferences(path, tok)


def test_skip_bad_records_and_truncation(tok: Tokenizer, tmp_path: Path) -> None:
    long = " ".join(["water"] * 30)
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "hi", "chosen": "a", "rejected": "b"},
        {"prompt": "hi", "chosen": long, "rejected": "b"},  # chosen cut inside the answer: truncated
        {"prompt": " ".join(["kettle"] * 40), "chosen": "a", "rejected": "b"},  # answers past max_len: dropped
        *(b for b, _ in BAD),
    ])
    pairs, stats = load_preferences(path, tok, max_len=24, skip_bad_lines=True)
    assert (stats.kept, stats.truncated, stats.dropped, stats.skipped) == (2, 1, 1, len(BAD))
    assert all(len(ids) <= 24 for pair in pairs for ids, _ in pair)


def test_batches_chosen_then_rejected(tok: Tokenizer) -> None:
    pairs = []
    for i in range(10):
        msgs = [{"role": "user", "content": f"what is {i}"}]
        pairs.append(tuple(encode_chat(tok, [*msgs, {"role": "assistant", "content": a}], first_labelled=1)
                           for a in (f"{i} litres", f"{i + 1} " + "water " * i)))
    ds = PreferenceDataset(pairs, tok.pad_id)
    b = ds.batch(2, 4, seed=5)
    idx = ds.order.indices(2, 4, 5)
    assert b["x"].shape[0] == b["y"].shape[0] == 8 and b["n"] == 4
    for row, i in enumerate(idx):
        for half, (ids, labels) in enumerate(pairs[i]):
            x, y = b["x"][row + 4 * half], b["y"][row + 4 * half]
            n = len(ids) - 1
            assert x[:n].tolist() == ids[:-1] and y[:n].tolist() == labels[1:]
            assert (x[n:] == tok.pad_id).all() and (y[n:] == IGNORE).all()
        assert runs(b["x"][row], b["y"][row].roll(1), tok) == [f"{i} litres<|im_end|>"]
    assert torch.equal(ds.batch(2, 4, seed=5)["x"], b["x"])
    parts = [ds.batch(2, 4, seed=5, rank=r, world_size=2) for r in range(2)]
    assert [i for r in range(2) for i in ds.order.indices(2, 4, 5, rank=r, world_size=2)] == list(idx)
    assert sum(p["n"] for p in parts) == 4 and all(p["x"].shape[0] == 4 for p in parts)
    assert [len(e["x"]) for e in ds.eval_batches(4)] == [8, 8, 4]


def test_demo_preference_pairs() -> None:
    train, val = demo_tasks.preference_pairs(200, seed=0), demo_tasks.preference_pairs(50, seed=0, split="val")
    assert train == demo_tasks.preference_pairs(200, seed=0)
    for r in train + val:
        assert r["chosen"] != r["rejected"]
        q = r["prompt"].removeprefix("帮我计算").removeprefix("What is ").split("的")[0].rstrip("?=")
        op = "+" if "+" in q else "-"
        a, b = map(int, q.split(op))
        assert r["chosen"].removeprefix("等于") == str(arithmetic(a, b, op))
        assert demo_tasks.is_val(a, b, op) == (r in val)


def test_product_manual_preferences(tok: Tokenizer) -> None:
    folder = ROOT / "examples" / "product_manual"
    train, stats = load_preferences(folder / "prefs_train.jsonl", tok)
    val, _ = load_preferences(folder / "prefs_val.jsonl", tok)
    assert stats.skipped == 0 and len(train) >= 100 and 40 <= len(val) <= 60
