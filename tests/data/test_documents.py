"""Reading documents: the three formats, bad lines named by file:line, sources, cutting big files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.data.documents import cut_file, iter_documents, iter_piece, iter_texts
from lmforge.data.errors import DataError


def test_iter_documents_formats(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes("\ufefffirst doc\r\nline two\r\n\r\n \n\nsecond\n\n\n".encode())
    assert list(iter_documents(tmp_path / "a.txt")) == [("first doc\r\nline two", 1), ("second", 6)]
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n\n{"text": "y", "id": 3}\n{"text": ""}\n')
    assert list(iter_documents(tmp_path / "b.jsonl")) == [("x", 1), ("y", 3)]


def test_bad_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"n.parquet:2: 'text' is NoneType"):
        list(iter_documents(tmp_path / "n.parquet"))
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c.parquet:1: no 'text' column"):
        list(iter_documents(tmp_path / "c.parquet"))


def test_iter_texts_reads_every_source_and_names_a_missing_one_at_once(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("one\n\ntwo\n")
    (tmp_path / "d" / "b.jsonl").write_text('{"text": "three"}\n')
    assert list(iter_texts([tmp_path / "d"])) == ["one", "two", "three"]
    with pytest.raises(DataError, match="nothing-here"):
        iter_texts([tmp_path / "d", tmp_path / "nothing-here.txt"])  # before any document is read


@pytest.mark.parametrize("name", ["a.txt", "a.jsonl"])
def test_cut_file_pieces_read_as_the_whole_file(tmp_path: Path, name: str) -> None:
    docs = [f"document {i} " + "word " * (i % 13) for i in range(200)]
    text = "".join(json.dumps({"text": d}) + "\n" for d in docs) if name.endswith(".jsonl") else \
        "\n\n".join(d.replace("word ", "word\n", 1) for d in docs) + "\n"
    (tmp_path / name).write_text(text)
    pieces = cut_file(tmp_path / name, 500)
    assert len(pieces) > 5 and sum(n for _, n in pieces) == len(text.encode())
    assert not any(p.whole for p, _ in pieces)
    read = [d for p, _ in pieces for d in iter_piece(p, False, None)]  # (document, line) pairs
    assert read == list(iter_documents(tmp_path / name))


def test_a_json_problem_is_said_once():
    import json

    from lmforge.data.errors import json_problem

    with pytest.raises(json.JSONDecodeError) as e:
        json.loads('{"text": "unterminated')
    assert json_problem(e.value) == "malformed JSON (unterminated string starting at column 10)"
