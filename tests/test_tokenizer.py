"""Tokenizer: training, losslessness, transformers parity, save/load, errors."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.data.documents import iter_texts
from lmforge.tokenizer import SpecialTokens, Tokenizer, train_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. 1234 + 5678 = 6912.",
    "def add(a, b):\n\treturn a + b  # tabs and\r\nwindows line ends",
    "机器学习是人工智能的一个分支。我们今天学习分词。",
    "Emoji 👍🏽 and family 👨‍👩‍👧‍👦 and flags 🇫🇷; café naïve résumé,",
    "e\u0301 a\u0308 (combining marks), ZWJ 👩🏾‍🚀",
    "Numbers: 3.14159, 2.71828, 1e-9, 100%, $42.00, 2024-06-01.",
] * 8

TRICKY = [
    "",
    " ",
    "  leading and trailing spaces  ",
    "中文分词测试，标点符号：“引号”。",
    "👨‍👩‍👧‍👦👩🏾‍🚀🏳️‍🌈",
    "e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937",  # combining marks, Devanagari conjunct
    "a" * 10_000,
    "line1\r\nline2\r\n\r\n",
    "\ttab\t\tdouble tab\n",
    "<|im_end|> literal special token text <|im_start|>",
    "\x00\x01\x7f nul and controls \u200b\ufeff",
    "12345678901234567890",
]


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text("\n\n".join(CORPUS[:20]) + "\n", encoding="utf-8")
    (d / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS[20:]), encoding="utf-8")
    return [d / "a.txt", d / "b.jsonl"]


@pytest.fixture(scope="module")
def tok(corpus_files: list[Path]) -> Tokenizer:
    return train_tokenizer(iter_texts(corpus_files), vocab_size=420, min_frequency=2)


def test_train_specials_and_digits(tok: Tokenizer) -> None:
    assert tok.eos_token == "<|im_end|>" and tok.eos_id == tok.backend.token_to_id("<|im_end|>")
    assert tok.pad_id == tok.backend.token_to_id("<|pad|>") and tok.bos_id is None
    assert 256 < tok.vocab_size <= 420
    assert len(tok.encode("12345")) == 5  # digits are split one by one
    assert tok.encode("<|im_end|>") == [tok.eos_id]
    # the trained merges are used: common words take fewer tokens than bytes
    assert len(tok.encode("The quick brown fox")) < len("The quick brown fox")


def test_train_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": CORPUS}), tmp_path / "c.parquet")
    t = train_tokenizer(iter_texts([tmp_path / "c.parquet"]), vocab_size=300)
    assert t.decode(t.encode(CORPUS[2])) == CORPUS[2]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=st.text())
def test_lossless_property(tok: Tokenizer, s: str) -> None:
    assert tok.decode(tok.encode(s)) == s


@pytest.mark.parametrize("s", TRICKY, ids=range(len(TRICKY)))
def test_lossless_explicit(tok: Tokenizer, s: str) -> None:
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert tok.encode_batch([s, s]) == [ids, ids]


def test_chat_template_chatml(tok: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text = tok.apply_chat_template(msgs)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    assert tok.apply_chat_template(msgs[:1], add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    ids = tok.apply_chat_template(msgs, tokenize=True)
    assert ids.count(tok.eos_id) == 2  # every turn, the answer included, ends with eos


def test_chat_template_globals(tok: Tokenizer) -> None:
    t = Tokenizer(tok.backend, bos_token=None, eos_token=tok.eos_token,
                  chat_template="{% if messages|length == 0 %}{{ raise_exception('empty') }}{% endif %}"
                                "{{ messages[0]['content'] | tojson }}{{ eos_token }}{{ foo }}")
    assert t.apply_chat_template([{"role": "user", "content": "é"}], foo="!") == '"é"<|im_end|>!'
    with pytest.raises(jinja2.TemplateError, match="empty"):
        t.apply_chat_template([])
    template = ("{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
                "{% if tools is not none %}tools{% endif %}")
    tagged = Tokenizer(tok.backend, bos_token=None, eos_token=tok.eos_token, chat_template=template)
    assert tagged.apply_chat_template([{"role": "assistant", "content": "ok"}]) == "ok"  # HF's generation tag
    evil = Tokenizer(tok.backend, bos_token=None, eos_token=tok.eos_token,
                     chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        evil.apply_chat_template([{"role": "user", "content": "x"}])


def test_save_load_roundtrip(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer_config.json",
                                                    "special_tokens_map.json"}
    t2 = Tokenizer.from_folder(tmp_path)
    assert t2.hash() == tok.hash()
    for attr in ("eos_id", "pad_id", "bos_id", "vocab_size", "add_bos"):
        assert getattr(t2, attr) == getattr(tok, attr)
    assert t2.chat_template == tok.chat_template
    for s in TRICKY:
        assert t2.encode(s) == tok.encode(s)


def test_load_hf_variants(tok: Tokenizer, tmp_path: Path) -> None:
    """Tokens as {"content": ...} dicts; chat template in chat_template.jinja / .json."""
    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["eos_token"] = {"content": "<|im_end|>", "special": True}
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "json:{{ eos_token }}"}))
    t = Tokenizer.from_folder(tmp_path)
    assert t.eos_id == tok.eos_id and t.apply_chat_template([]) == "json:<|im_end|>"
    (tmp_path / "chat_template.jinja").write_text("jinja:{{ messages|length }}")
    assert Tokenizer.from_folder(tmp_path).apply_chat_template([]) == "jinja:0"


def test_bad_folder(tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path / "nope")
    tok.save(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|not-a-token|>"}))
    with pytest.raises(ValueError, match="tokenizer_config.json.*not-a-token"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_folder(tmp_path)


@pytest.mark.parametrize("with_bos", [False, True])
def test_transformers_parity(corpus_files: list[Path], tmp_path: Path, with_bos: bool) -> None:
    """AutoTokenizer reads our folder and gives the same ids, text and chat template output."""
    transformers = pytest.importorskip("transformers")
    sp = SpecialTokens(bos="<|bos|>") if with_bos else SpecialTokens()
    tok = train_tokenizer(iter_texts(corpus_files), vocab_size=400, special_tokens=sp, add_bos=with_bos)
    tok.save(tmp_path)
    loaded = Tokenizer.from_folder(tmp_path)
    assert loaded.add_bos == with_bos and loaded.hash() == tok.hash()
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (tok.eos_id, tok.pad_id, tok.bos_id)
    assert len(hf) == tok.vocab_size
    for s in TRICKY[1:] + CORPUS[:5]:  # (transformers returns [] for "" even when it adds bos)
        ids = tok.encode(s)
        assert hf(s)["input_ids"] == ids, s
        assert hf.decode(ids) == tok.decode(ids) == (("<|bos|>" if with_bos else "") + s)
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2? 你好"},
            {"role": "assistant", "content": "4 👍"}]
    for gen in (False, True):
        convo = msgs[:2] if gen else msgs
        assert hf.apply_chat_template(convo, tokenize=False, add_generation_prompt=gen) == \
            tok.apply_chat_template(convo, add_generation_prompt=gen)
        assert hf.apply_chat_template(convo, tokenize=True, add_generation_prompt=gen, return_dict=False) == \
            tok.apply_chat_template(convo, add_generation_prompt=gen, tokenize=True)
