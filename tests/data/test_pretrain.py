"""Pretraining data: reading documents, prepare (shards, manifest, resume, errors), PackedDataset."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as Backend

from lmforge.data import pretrain
from lmforge.data.errors import DataError
from lmforge.data.pretrain import Manifest, PackedDataset, iter_documents, prepare
from lmforge.tokenizer import Tokenizer, train_tokenizer

WORDS = "the cat sat on a mat and then it ran far away from home 42 7 中文 🙂".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer([], vocab_size=320, documents=make_docs(200, seed=1))


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    """A folder with a .jsonl, a blank-line separated .txt and (if pyarrow) a .parquet; returns all docs."""
    d = tmp_path / "corpus"
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
    return d, [t.replace(" on ", " on\n") if 100 <= i < 200 else t for i, t in enumerate(docs)]


def shard_docs(out: Path, m: Manifest, split: str, tok: Tokenizer) -> list[str]:
    ids = np.concatenate([np.fromfile(out / s.file, dtype=m.dtype) for s in m.splits[split]])
    assert len(ids) == 0 or ids[-1] == tok.eos_id
    cuts = np.flatnonzero(ids == tok.eos_id)
    return [tok.decode(ids[a + 1:b].tolist()) for a, b in zip([-1, *cuts[:-1]], cuts)]


# ---------------------------------------------------------------- reading


def test_iter_documents_formats(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes("\ufefffirst doc\r\nline two\r\n\r\n \n\nsecond\n\n\n".encode())
    assert list(iter_documents(tmp_path / "a.txt")) == [("first doc\r\nline two", 1), ("second", 6)]
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n\n{"text": "y", "id": 3}\n{"text": ""}\n')
    assert list(iter_documents(tmp_path / "b.jsonl")) == [("x", 1), ("y", 3)]


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


def test_bad_parquet(tmp_path: Path, tok: Tokenizer) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"n.parquet:2: 'text' is NoneType"):
        list(iter_documents(tmp_path / "n.parquet"))
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c.parquet:1: no 'text' column"):
        list(iter_documents(tmp_path / "c.parquet"))


# ---------------------------------------------------------------- prepare


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
    assert not list(out.glob("*.tmp"))


def test_parallel_and_chunked_match_serial(corpus: tuple[Path, list[str]], tok: Tokenizer, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    src, _ = corpus
    m1 = prepare([src], tok, tmp_path / "serial", workers=1, progress=False)
    monkeypatch.setattr(pretrain, "MIN_PART_BYTES", 1500)  # cut files into many parts
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
    monkeypatch.setattr(pretrain, "MIN_PART_BYTES", 1500)
    src, _ = corpus
    out = tmp_path / "out"
    m = prepare([src], tok, out, shard_tokens=100, workers=1, progress=False)
    files = sorted(out.glob("*.bin"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    calls: list[int] = []
    run_part = pretrain._run_part
    def counting_run_part(job: pretrain._Job, backend: Backend | None = None) -> dict:
        calls.append(job.part.index)
        return run_part(job, backend)

    monkeypatch.setattr(pretrain, "_run_part", counting_run_part)
    assert prepare([src], tok, out, shard_tokens=100, workers=1, progress=False) == m
    assert calls == [] and all(f.stat().st_mtime_ns == t for f, t in stamps.items())

    # an interrupted part: its json (the commit marker) is gone and a half-written .tmp shard is left behind
    victim = m.splits["train"][1].file
    part_json = next(out.glob("part-00001-*.json"))
    part_json.unlink()
    (out / (victim + ".tmp")).write_bytes(b"\x01\x02garbage")
    # a truncated shard of another part is not trusted either
    other = out / m.splits["train"][2].file
    other.write_bytes(other.read_bytes()[:-2])
    assert prepare([src], tok, out, shard_tokens=100, workers=1, progress=False) == m
    assert sorted(calls) == [1, 2]
    assert not list(out.glob("*.tmp"))
    redone = ("train-00001", "val-00001", "train-00002", "val-00002")
    untouched = [f for f in files if not f.name.startswith(redone)]
    assert all(f.stat().st_mtime_ns == stamps[f] for f in untouched)


def test_other_tokenizer_refused(corpus: tuple[Path, list[str]], tok: Tokenizer, tmp_path: Path) -> None:
    src, _ = corpus
    prepare([src / "a.jsonl"], tok, tmp_path / "out", workers=1, progress=False)
    other = train_tokenizer([], vocab_size=300, documents=make_docs(50, seed=9))
    with pytest.raises(ValueError, match="another tokenizer"):
        prepare([src / "a.jsonl"], other, tmp_path / "out", workers=1, progress=False)


def test_bad_input_keeps_prepared_data(corpus: tuple[Path, list[str]], tok: Tokenizer, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pretrain, "MIN_PART_BYTES", 1500)
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
    assert Manifest.load(out) == m and not list(out.glob("*.tmp"))
    bad.write_text('{"text": "ok"}\n{"text": "fixed"}\n')
    m2 = prepare(sources, tok, out, shard_tokens=100, workers=2, progress=False)
    assert m2.total_docs == m.total_docs + 2


def test_missing_source(tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothing-here"):
        prepare([tmp_path / "nothing-here*.jsonl"], tok, tmp_path / "out", progress=False)


# ---------------------------------------------------------------- PackedDataset


@pytest.fixture
def prepared(corpus: tuple[Path, list[str]], tok: Tokenizer, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(pretrain, "MIN_PART_BYTES", 1500)
    prepare([corpus[0]], tok, tmp_path / "data", shard_tokens=100, val_fraction=0.2, workers=1,
            progress=False)
    return tmp_path / "data"


def test_packed_windows(prepared: Path) -> None:
    ds = PackedDataset(prepared, "train", seq_len=16)
    m = ds.manifest
    stream = np.concatenate([np.fromfile(prepared / s.file, dtype=m.dtype) for s in m.splits["train"]])
    assert len(m.splits["train"]) > 3 and len(ds) == (len(stream) - 1) // 16
    for i in range(len(ds)):  # windows that cross shard ends read correctly
        assert (ds.window(i) == stream[i * 16:i * 16 + 17]).all()
    x, y = ds.batch(0, 4)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert (x[:, 1:] == y[:, :-1]).all()


def test_batch_is_a_function_of_seed_and_step(prepared: Path) -> None:
    ds = PackedDataset(prepared, "train", seq_len=16)
    again = PackedDataset(prepared, "train", seq_len=16)
    x5, y5 = ds.batch(5, 8, seed=3)
    ds.batch(6, 8, seed=3)
    assert torch.equal(again.batch(5, 8, seed=3)[0], x5) and torch.equal(ds.batch(5, 8, seed=3)[1], y5)
    assert not torch.equal(ds.batch(6, 8, seed=3)[0], x5)
    assert not torch.equal(ds.batch(5, 8, seed=4)[0], x5)
    # one epoch visits every window once
    n = len(ds)
    seen = np.concatenate([ds.indices(s, 8, seed=3) for s in range(n // 8)])
    assert len(set(seen.tolist())) == len(seen) == n // 8 * 8


def test_rank_slices(prepared: Path) -> None:
    ds = PackedDataset(prepared, "train", seq_len=16)
    gx, gy = ds.batch(7, 8, seed=1)
    parts = [ds.batch(7, 8, seed=1, rank=r, world_size=4) for r in range(4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), gx)
    assert torch.equal(torch.cat([p[1] for p in parts]), gy)
    idx = [set(ds.indices(7, 8, seed=1, rank=r, world_size=4).tolist()) for r in range(4)]
    assert sum(len(i) for i in idx) == len(set().union(*idx)) == 8
    with pytest.raises(ValueError, match="divisible"):
        ds.batch(0, 6, rank=0, world_size=4)


def test_eval_batches(prepared: Path) -> None:
    ds = PackedDataset(prepared, "val", seq_len=8)
    batches = list(ds.eval_batches(4))
    assert sum(len(x) for x, _ in batches) == len(ds)
    assert torch.equal(batches[0][0][1], torch.from_numpy(ds.window(1)[:-1].astype(np.int64)))
    assert len(list(ds.eval_batches(4, max_batches=2))) == 2
    two = [list(ds.eval_batches(4, rank=r, world_size=2)) for r in range(2)]
    assert len(two[0]) == len(two[1]) == len(ds) // 4
    assert torch.equal(torch.cat([two[0][0][0], two[1][0][0]]), batches[0][0])


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="manifest.json"):
        PackedDataset(tmp_path, "train", 8)


def test_uint32_for_big_vocab(tmp_path: Path, tok: Tokenizer) -> None:
    backend = Backend.from_str(tok.backend.to_str())
    backend.add_tokens([f"<extra{i}>" for i in range(2**16)])
    big = Tokenizer(backend, bos_token=None, eos_token=tok.eos_token)
    (tmp_path / "a.jsonl").write_text('{"text": "the cat <extra65535>"}\n')
    m = prepare([tmp_path / "a.jsonl"], big, tmp_path / "out", workers=1, val_fraction=0, progress=False)
    assert m.dtype == "uint32"
    ids = np.fromfile(tmp_path / "out" / m.splits["train"][0].file, dtype=np.uint32)
    assert ids[-2] == backend.token_to_id("<extra65535>") >= 2**16 and ids[-1] == big.eos_id
