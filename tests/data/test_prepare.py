"""Prepare: token shards and manifest, parallel and chunked runs, resume, bad input, tokenizer checks."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer as Backend

from lmforge.data import prepare as preparing
from lmforge.data.documents import Piece, iter_documents, iter_piece
from lmforge.data.errors import DataError
from lmforge.data.prepare import Manifest, prepare
from lmforge.tokenizer import Tokenizer, train_tokenizer

WORDS = "the cat sat on a mat and then it ran far away from home 42 7 中文 🙂".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 60))) for _ in range(n)]


def small_tok() -> Tokenizer:
    return train_tokenizer(make_docs(200, seed=1), vocab_size=320)


def write_corpus(d: Path) -> list[str]:
    """A .jsonl, a blank-line separated .txt and (if pyarrow) a .parquet in folder `d`; returns all docs."""
    d.mkdir()
    docs = make_docs(300)
    (d / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:100]))
    txt = "\n\n".join(t.replace(" on ", " on\n") for t in docs[100:200]) + "\n"  # multi-line documents
    (d / "b.txt").write_text(txt, encoding="utf-8")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs[200:]}), d / "c.parquet", row_group_size=30)
    except ImportError:
        docs = docs[:200]
    return [t.replace(" on ", " on\n") if 100 <= i < 200 else t for i, t in enumerate(docs)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return small_tok()


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    return tmp_path / "corpus", write_corpus(tmp_path / "corpus")


def shard_docs(out: Path, m: Manifest, split: str, tok: Tokenizer) -> list[str]:
    ids = np.concatenate([np.fromfile(out / s.file, dtype=m.dtype) for s in m.splits[split]])
    assert len(ids) == 0 or ids[-1] == tok.eos_id
    cuts = np.flatnonzero(ids == tok.eos_id)
    return [tok.decode(ids[a + 1:b].tolist()) for a, b in zip([-1, *cuts[:-1]], cuts)]


BAD = {
    "utf8.txt": (b"fine\n\nalso fine\n\xff\xfe broken\n", "utf8.txt:4: invalid UTF-8"),
    "json.jsonl": (b'{"text": "ok"}\n{"text": "unterminated\n', "json.jsonl:2: malformed JSON"),
    "missing.jsonl": (b'{"text": "ok"}\n{"txt": "typo"}\n', "missing.jsonl:2: missing 'text'"),
    "notstr.jsonl": (b'{"text": "ok"}\n{"text": 5}\n', "notstr.jsonl:2: 'text' is int"),
    "empty.txt": (b"", "empty.txt:1: empty file"),
    "blank.jsonl": (b"\n  \n", "blank.jsonl:1: empty file"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input(tmp_path: Path, tok: Tokenizer, name: str) -> None:
    content, message = BAD[name]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        list(iter_documents(tmp_path / name))
    with pytest.raises(DataError, match=message):
        prepare([tmp_path / name], tok, tmp_path / "out", workers=1, progress=False)
    skipped: list[str] = []
    docs = list(iter_documents(tmp_path / name, skip_bad_lines=True, skipped=skipped))
    assert len(skipped) == 1 and message in skipped[0]
    (tmp_path / "good.jsonl").write_text('{"text": "good"}\n')
    m = prepare([tmp_path / name, tmp_path / "good.jsonl"], tok, tmp_path / "out", workers=1,
                skip_bad_lines=True, val_fraction=0.0, progress=False)
    assert m.skipped_lines == {str((tmp_path / name).resolve()): 1}
    assert m.total_docs == len(docs) + 1 and message in m.skipped_examples[0]


def test_prepare_shards_and_manifest(corpus: tuple[Path, list[str]], tok: Tokenizer, tmp_path: Path) -> None:
    src, docs = corpus
    out = tmp_path / "out"
    m = prepare([src], tok, out, val_fraction=0.2, workers=1, progress=False)
    assert m == Manifest.load(out)
    assert m.dtype == "uint16" and m.tokenizer_hash == tok.hash() and m.lmforge_version
    assert m.total_docs == len(docs) and m.docs("val") > 0 and m.docs("train") > m.docs("val")
    for split in ("train", "val"):
        for s in m.splits[split]:
            assert (out / s.file).stat().st_size == 2 * s.tokens
    train, val = shard_docs(out, m, "train", tok), shard_docs(out, m, "val", tok)
    assert sorted(train + val) == sorted(docs)  # every document once, each followed by eos
    assert m.total_tokens == sum(len(tok.encode(d)) + 1 for d in docs)
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["total_docs"] == len(docs) and saved["splits"]["val"]["docs"] == m.docs("val")
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp-*"))


def test_parallel_and_chunked_match_serial(corpus: tuple[Path, list[str]], tok: Tokenizer, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    src, _ = corpus
    m1 = prepare([src], tok, tmp_path / "serial", workers=1, progress=False)
    monkeypatch.setattr(preparing, "MIN_PART_BYTES", 1500)  # cut files into many parts
    m2 = prepare([src / "*.*"], tok, tmp_path / "parallel", workers=2, shard_tokens=100, progress=False)
    assert len(m2.splits["train"]) > 2 * len(m1.splits["train"])
    for split in ("train", "val"):
        serial = shard_docs(tmp_path / "serial", m1, split, tok)
        assert serial == shard_docs(tmp_path / "parallel", m2, split, tok)
    assert m1.total_tokens == m2.total_tokens
    for name in ("a.jsonl", "b.txt"):  # big files were cut into several parts, at document boundaries
        assert sum(any(name in x for x in s.sources) for s in m2.splits["train"]) > 1


def test_rerun_skips_complete_parts(corpus: tuple[Path, list[str]], tok: Tokenizer, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preparing, "MIN_PART_BYTES", 1500)
    src, _ = corpus
    out = tmp_path / "out"
    m = prepare([src], tok, out, shard_tokens=100, workers=1, progress=False)
    files = sorted(out.glob("*.bin"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    calls: list[int] = []
    run_part = preparing._run_part
    def counting_run_part(job: preparing._Job, backend: Backend | None = None) -> dict:
        calls.append(job.part.index)
        return run_part(job, backend)

    monkeypatch.setattr(preparing, "_run_part", counting_run_part)
    assert prepare([src], tok, out, shard_tokens=100, workers=1, progress=False) == m
    assert calls == [] and all(f.stat().st_mtime_ns == t for f, t in stamps.items())

    # an interrupted part: its json (the commit marker) is gone and half-written shards are left behind (a
    # killed worker's temporary, and the `.tmp` name of versions before atomic_file)
    victim = m.splits["train"][1].file
    part_json = next(out.glob("part-00001-*.json"))
    part_json.unlink()
    (out / (victim + ".tmp")).write_bytes(b"\x01\x02garbage")
    (out / f".{victim}.tmp-0badf00d").write_bytes(b"\x01\x02garbage")
    # a truncated shard of another part is not trusted either
    other = out / m.splits["train"][2].file
    other.write_bytes(other.read_bytes()[:-2])
    assert prepare([src], tok, out, shard_tokens=100, workers=1, progress=False) == m
    assert sorted(calls) == [1, 2]
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp-*"))
    redone = ("train-00001", "val-00001", "train-00002", "val-00002")
    untouched = [f for f in files if not f.name.startswith(redone)]
    assert all(f.stat().st_mtime_ns == stamps[f] for f in untouched)


def test_ctrl_c_commits_whole_parts_and_a_rerun_resumes(corpus: tuple[Path, list[str]], tok: Tokenizer,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preparing, "MIN_PART_BYTES", 1500)
    src, _ = corpus
    whole = prepare([src], tok, tmp_path / "whole", shard_tokens=100, workers=1, progress=False)
    out = tmp_path / "out"
    calls = [0]

    def interrupted(piece: Piece, *args: Any) -> Iterator[tuple[str, int]]:  # Ctrl-C inside the 4th piece
        calls[0] += 1
        for i, doc in enumerate(iter_piece(piece, *args)):
            if calls[0] == 4 and i == 1:
                raise KeyboardInterrupt
            yield doc

    monkeypatch.setattr(preparing, "iter_piece", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], tok, out, shard_tokens=100, workers=1, progress=False)
    committed = sorted(f.name for f in out.glob("part-*.json"))
    assert 0 < len(committed) < len(whole.splits["train"]) and not (out / "manifest.json").exists()
    assert not list(out.glob(".*.tmp-*"))  # the interrupted part left nothing half-written
    assert len(list(out.glob("*.bin"))) == 2 * len(committed)  # and no shard without its part json
    monkeypatch.setattr(preparing, "iter_piece", iter_piece)
    assert prepare([src], tok, out, shard_tokens=100, workers=1, progress=False) == whole


def test_other_tokenizer_refused(corpus: tuple[Path, list[str]], tok: Tokenizer, tmp_path: Path) -> None:
    src, _ = corpus
    prepare([src / "a.jsonl"], tok, tmp_path / "out", workers=1, progress=False)
    other = train_tokenizer(make_docs(50, seed=9), vocab_size=300)
    with pytest.raises(ValueError, match="another tokenizer"):
        prepare([src / "a.jsonl"], other, tmp_path / "out", workers=1, progress=False)


def test_bad_input_keeps_prepared_data(corpus: tuple[Path, list[str]], tok: Tokenizer, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preparing, "MIN_PART_BYTES", 1500)
    src, _ = corpus
    out = tmp_path / "out"
    m = prepare([src / "a.jsonl", src / "b.txt"], tok, out, shard_tokens=100, workers=1, progress=False)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    bad = tmp_path / "z.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    sources = [src / "a.jsonl", bad, src / "b.txt"]
    with pytest.raises(DataError, match="z.jsonl:2"):  # raised in a worker process, re-raised here
        prepare(sources, tok, out, shard_tokens=100, workers=2, progress=False)
    assert all((out / name).read_bytes() == data for name, data in before.items())
    assert Manifest.load(out) == m and not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp-*"))
    bad.write_text('{"text": "ok"}\n{"text": "fixed"}\n')
    m2 = prepare(sources, tok, out, shard_tokens=100, workers=2, progress=False)
    assert m2.total_docs == m.total_docs + 2


def test_missing_source(tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothing-here"):
        prepare([tmp_path / "nothing-here*.jsonl"], tok, tmp_path / "out", progress=False)


def test_uint32_for_big_vocab(tmp_path: Path, tok: Tokenizer) -> None:
    backend = Backend.from_str(tok.backend.to_str())
    backend.add_tokens([f"<extra{i}>" for i in range(2**16)])
    big = Tokenizer(backend, bos_token=None, eos_token=tok.eos_token)
    (tmp_path / "a.jsonl").write_text('{"text": "the cat <extra65535>"}\n')
    m = prepare([tmp_path / "a.jsonl"], big, tmp_path / "out", workers=1, val_fraction=0, progress=False)
    assert m.dtype == "uint32"
    ids = np.fromfile(tmp_path / "out" / m.splits["train"][0].file, dtype=np.uint32)
    assert ids[-2] == backend.token_to_id("<extra65535>") >= 2**16 and ids[-1] == big.eos_id
