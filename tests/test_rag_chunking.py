"""Chunking: token budgets, overlap, paragraph/sentence/heading boundaries, characters never split; the BM25
terms of Chinese text; reading documents (HTML, JSONL, undecodable files)."""

from __future__ import annotations

import re

import pytest

from lmforge.rag.chunking import chunk_sections, markdown_sections, split_text
from lmforge.rag.documents import Section, Unreadable, html_to_text, read_document
from lmforge.rag.index import terms


def words(text: str) -> list[tuple[int, int]]:
    """One token per word or punctuation mark; one per character in CJK text."""
    return [m.span() for m in re.finditer(r"[\u4e00-\u9fff]|\w+|[^\w\s]", text)]


def byte_tokens(text: str) -> list[tuple[int, int]]:
    """Byte-level tokens: one per UTF-8 byte, so a multi-byte character is several tokens with the same span
    (as byte-level BPE reports a character it cuts)."""
    return [(i, i + 1) for i, ch in enumerate(text) for _ in ch.encode()]


PARAS = [" ".join(f"Sentence {p}.{s} says something about item {p * 10 + s}." for s in range(4)) for p in range(6)]
TEXT = "\n\n".join(PARAS)


def test_chunks_keep_the_budget_overlap_and_cover_the_text():
    spans = split_text(TEXT, words(TEXT), max_tokens=40, overlap=10)
    assert len(spans) > 3
    for (s, e, n), (s2, _, _) in zip(spans, spans[1:]):
        assert n <= 40
        assert s < s2 < e, "neighbours overlap and the text moves on"
        assert len(words(TEXT[s2:e])) <= 10
    assert spans[0][0] == 0 and spans[-1][1] == len(TEXT)
    covered = set()
    for s, e, _ in spans:
        covered |= set(range(s, e))
    assert all(i in covered for i, ch in enumerate(TEXT) if not ch.isspace())


def test_cuts_fall_on_paragraph_then_sentence_boundaries():
    spans = split_text(TEXT, words(TEXT), max_tokens=45, overlap=0)
    for _, e, _ in spans[:-1]:
        assert TEXT[e:e + 2] == "\n\n", "a paragraph (40 tokens) fits, two do not: cut at its end"
    one = PARAS[0]  # one paragraph of 40 tokens in chunks of 20: cut after a sentence
    for _, e, _ in split_text(one, words(one), max_tokens=20, overlap=0)[:-1]:
        assert one[e - 1] == "."
    with pytest.raises(ValueError, match="overlap"):
        split_text(TEXT, words(TEXT), max_tokens=10, overlap=6)


@pytest.mark.parametrize("tokens", [byte_tokens, words])
def test_a_chunk_never_splits_a_character(tokens):
    text = "水壶的容量是一点七升。🙂 Émile's kettle café — naïve 😀😀 " * 8
    spans = split_text(text, tokens(text), max_tokens=7, overlap=3)
    toks = tokens(text)
    for s, e, n in spans:
        assert text[s:e].encode("utf-8").decode("utf-8") == text[s:e]
        assert n == sum(1 for a, b in toks if s <= a and b <= e), "every byte token of a character in one chunk"
    assert sum(n for _, _, n in split_text(text, toks, 7, 0)) == len(toks)


def test_markdown_headings_make_sections_with_their_path():
    md = "# Manual\n\nIntro.\n\n## Errors\n\nE1 means empty.\n\n```\n# not a heading\n```\n\n## Care\n\nDescale.\n"
    secs = markdown_sections(md)
    assert [h for h, *_ in secs] == ["Manual", "Manual > Errors", "Manual > Care"]
    assert "# not a heading" in md[secs[1][1]:secs[1][2]]
    chunks = chunk_sections([Section(md)], words, 64, 8, markdown=True)
    assert [(c.heading, c.text) for c in chunks][-1] == ("Manual > Care", "Descale.")
    assert chunks[1].embed_text.startswith("Manual > Errors\nE1 means empty.")
    assert all(md[c.start:c.end].strip() == c.text for c in chunks)


def test_chinese_terms_are_characters_and_bigrams():
    ts = terms("水壶的容量是1.7升, the K7's Kettle")
    assert {"水", "壶", "水壶", "容量", "升"} <= set(ts)
    assert "k7" in ts and "kettle" in ts and "the" not in ts and "s" not in ts


def test_documents_html_jsonl_and_undecodable(tmp_path):
    html = ("<html><head><title>x</title><script>var a = 1;</script></head><body><h1>Manual</h1><p>Hello "
            "<b>there</b>.</p><h2>Errors</h2><ul><li>E1: empty</li></ul></body></html>")
    text = html_to_text(html)
    assert "var a" not in text and "# Manual" in text and "## Errors" in text and "Hello there." in text
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\nnot json\n{"text": "two"}\n')
    bad: list[str] = []
    assert [s.location for s in read_document(tmp_path / "a.jsonl", bad)] == ["line 1", "line 3"]
    assert len(bad) == 1 and "a.jsonl:2" in bad[0]
    (tmp_path / "b.md").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(Unreadable, match="not UTF-8"):
        read_document(tmp_path / "b.md")
    (tmp_path / "c.txt").write_bytes(b"\x7fELF\x00\x01\x02")
    with pytest.raises(Unreadable, match="binary"):
        read_document(tmp_path / "c.txt")
    (tmp_path / "d.txt").write_text("  \n")
    with pytest.raises(Unreadable, match="no text"):
        read_document(tmp_path / "d.txt")
