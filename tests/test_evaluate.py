"""Evaluation: perplexity equals `transformers`' labels= loss on the same windows; multiple-choice accuracy."""

from __future__ import annotations

import json

import pytest
import torch

import lmforge
from lmforge.data.labels import IGNORE
from lmforge.evaluate import choice_logprobs, multiple_choice, perplexity

TEXTS = ["The cat sat on the mat.", "Ünïcode 你好 and numbers 12345.", "short", "A longer document " * 4]


@pytest.fixture(scope="module")
def setup(tiny_folder):
    """A tiny random llama-family model over a byte-level tokenizer, and the same weights in `transformers`."""
    import transformers as tf

    model, tok = lmforge.load(tiny_folder, device="cpu")
    ref = tf.AutoModelForCausalLM.from_pretrained(tiny_folder, attn_implementation="eager").eval()
    return model.eval(), tok, ref


def test_perplexity_matches_transformers_on_the_same_windows(setup, tmp_path):
    model, tok, ref = setup
    ids = [t for text in TEXTS for t in tok.encode(text) + [tok.eos_id]]
    seq_len = 16
    nll = n = 0.0
    with torch.no_grad():
        for i in range(0, len(ids), seq_len):
            w = torch.tensor([ids[i:i + seq_len]])
            if w.shape[1] >= 2:
                nll += ref(w, labels=w).loss.item() * (w.shape[1] - 1)
                n += w.shape[1] - 1
    got = perplexity(model, tok, TEXTS, seq_len=seq_len, batch_size=3, progress=False)
    assert got["tokens"] == n == len(ids) - -(-len(ids) // seq_len)
    assert got["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert got["ppl"] == pytest.approx(torch.tensor(nll / n).exp().item(), rel=1e-5)

    (tmp_path / "docs.txt").write_text("\n\n".join(TEXTS) + "\n")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    for name in ("docs.txt", "docs.jsonl"):
        assert perplexity(model, tok, tmp_path / name, seq_len=seq_len, progress=False) == pytest.approx(got)
    with pytest.raises(ValueError, match="seq_len"):
        perplexity(model, tok, TEXTS, seq_len=65)


def _hf_choice_score(ref, tok, question: str, choice: str) -> float:
    """Sum of log-probs of the choice tokens from `transformers`' labels= loss with the question masked."""
    ctx, cont = tok.encode(question), tok.encode(" " + choice, add_bos=False)
    ids = torch.tensor([ctx + cont])
    labels = torch.tensor([[IGNORE] * len(ctx) + cont])
    with torch.no_grad():
        return -ref(ids, labels=labels).loss.item() * len(cont)


def test_multiple_choice_accuracy_by_hand(setup, tmp_path):
    model, tok, ref = setup
    questions = [("Where did the cat sit?", ["on the mat", "in space", "on a cloud"]),
                 ("Say hello:", ["你好", "goodbye"]),
                 ("Count:", ["1 2 3", "a b c", "zzz", "12345."])]
    scores = [[_hf_choice_score(ref, tok, q, c) for c in cs] for q, cs in questions]
    for (q, cs), s in zip(questions, scores):
        assert choice_logprobs(model, tok, q, cs) == pytest.approx(s, rel=1e-4, abs=1e-4)
    best = [max(range(len(s)), key=s.__getitem__) for s in scores]
    answers = [best[0], questions[1][1][best[1]], (best[2] + 1) % 4]  # right (index), right (text), wrong
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps({"question": q, "choices": cs, "answer": a}) + "\n"
                            for (q, cs), a in zip(questions, answers)) + "\n")
    result = multiple_choice(model, tok, path, progress=False)
    norm = [max(range(len(cs)), key=lambda i: s[i] / len(cs[i])) for (_, cs), s in zip(questions, scores)]
    index = [best[0], best[1], answers[2]]
    assert result == {"accuracy": pytest.approx(2 / 3), "n": 3,
                      "accuracy_norm": pytest.approx(sum(a == b for a, b in zip(norm, index)) / 3)}


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"question": "q", "choices": ["a"], "answer": 0}', "at least 2"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "choice index"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "c"}', "not one of the choices"),
    ('{"choices": ["a", "b"], "answer": 0}', "'question'"),
    ('["q", ["a", "b"], 0]', "JSON object"),
])
def test_multiple_choice_bad_line_names_file_and_line(setup, tmp_path, line, message):
    model, tok, _ = setup
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "choices": ["a", "b"], "answer": "b"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{message}"):
        multiple_choice(model, tok, path, progress=False)
