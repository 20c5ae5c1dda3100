"""The index: one SQLite database holding the documents (path, sha256), their chunks (text, heading, location,
sha256, embedding) and an FTS5 table of the chunks' terms for BM25.

Search is lexical BM25 (SQLite FTS5), dense (cosine against every chunk's embedding: a (chunks, dim) float32
matrix product, 15 MB and ~1 ms at 10k chunks), or both fused by reciprocal rank fusion. The BM25 terms are
made here (`terms`): words folded to lower case, Porter-stemmed by FTS5, and Chinese/Japanese/Korean text as
single characters plus character bigrams — FTS5's own tokenizers keep a whole CJK run as one token.
FTS5 rather than `bm25s` (benchmarks/rag.py): its table lives in the same database, so an update is one
transaction with the chunks it indexes, where bm25s rebuilds its whole matrix on any change; with these terms
it finds more on the product manual (recall@1 0.75 against bm25s's 0.62 with its own tokenizer); bm25s answers
faster (0.4 against ~9 ms at 12k chunks), both well inside a query's embedding time.

`Index.build` keeps an index in step with folders: it works on a copy (`INDEX.building`) that is committed one
file at a time and renamed over INDEX only when complete. A killed run leaves INDEX as it was; the next run
resumes from the copy, re-reading only the files whose sha256 it does not hold yet.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmforge.data.errors import DataError
from lmforge.rag.chunking import Chunk, chunk_sections
from lmforge.rag.documents import MARKUP, Unreadable, find_documents, read_document
from lmforge.rag.embed import Embedder, EmbedderLike

SCHEMA = "1"
ANALYSER = "words+cjk-bigrams, porter unicode61"  # changing `terms` means another value (and a rebuild)
MODES = ("bm25", "dense", "hybrid")
RRF_K = 60  # reciprocal rank fusion: score = sum over retrievers of 1 / (RRF_K + rank)
DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP = 128, 24

_TABLES = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE documents (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, source TEXT NOT NULL,
                        sha256 TEXT NOT NULL, bytes INTEGER NOT NULL, n_chunks INTEGER NOT NULL);
CREATE TABLE chunks (id INTEGER PRIMARY KEY, doc_id INTEGER NOT NULL REFERENCES documents(id), ord INTEGER NOT NULL,
                     location TEXT NOT NULL, heading TEXT NOT NULL, text TEXT NOT NULL, n_tokens INTEGER NOT NULL,
                     sha256 TEXT NOT NULL, embedding BLOB NOT NULL);
CREATE INDEX chunks_doc ON chunks(doc_id);
CREATE VIRTUAL TABLE chunks_fts USING fts5(terms, tokenize = 'porter unicode61 remove_diacritics 2');
"""

# ---------------------------------------------------------------- lexical terms

_WORD = re.compile(r"[^\W_]+")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]+")
STOP_WORDS = frozenset("""a an and are as at be been but by can could did do does for from had has have how i if in
into is it its may me my no not of on or our should so than that the their them then there these they this to
was we were what when where which who whom why will with would you your""".split())


def terms(text: str) -> list[str]:
    """The BM25 terms of a text: lower-case words (no stop words, no single Latin letters) and, for CJK text,
    each character and each pair of neighbouring characters."""
    out: list[str] = []
    for word in _WORD.findall(text.casefold()):
        pos = 0
        for m in _CJK.finditer(word):
            out += _latin(word[pos:m.start()])
            run = m.group()
            out += list(run) + [run[i:i + 2] for i in range(len(run) - 1)]
            pos = m.end()
        out += _latin(word[pos:])
    return out


def _latin(word: str) -> list[str]:
    return [word] if word and word not in STOP_WORDS and (len(word) > 1 or word.isdigit()) else []


def _match_query(text: str) -> str | None:
    """An FTS5 query matching any of the text's terms (quoted: terms are letters and digits only)."""
    ts = list(dict.fromkeys(terms(text)))
    return " OR ".join(f'"{t}"' for t in ts) if ts else None


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk: where it comes from, its text, and its score under the search mode."""

    source: str  # the file, as named when indexed (relative to the working folder when inside it)
    location: str  # "p. 3" in a PDF, "line 12" in a JSONL file, "" otherwise
    heading: str  # the section's heading path in Markdown/HTML
    text: str
    chunk: int  # the chunk's number in its document, from 0
    score: float  # bm25: BM25 score; dense: cosine similarity; hybrid: reciprocal rank fusion score
    chunk_id: int

    def cite(self) -> str:
        """`file, p. 3, chunk 2` — what an answer prints for this source."""
        return ", ".join(x for x in (self.source, self.location, f"chunk {self.chunk}") if x)


@dataclass
class IndexReport:
    """What one `Index.build`/`add` did."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) — kept as indexed before
    ignored: list[str] = field(default_factory=list)  # files of unsupported type found in folders
    bad_lines: list[str] = field(default_factory=list)  # JSONL lines skipped in files otherwise indexed
    embedded: int = 0  # chunks embedded in this run
    reused: int = 0  # chunks of changed files whose text (hence embedding) was already in the index
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"{len(self.added)} added, {len(self.updated)} updated, {len(self.unchanged)} unchanged, "
                 f"{len(self.removed)} removed; {self.embedded} chunks embedded ({self.reused} reused) in "
                 f"{self.seconds:.1f} s"]
        if self.skipped:
            lines.append(f"{len(self.skipped)} file(s) skipped (what was indexed from them before is kept):")
            lines += [f"  {f}: {why}" for f, why in self.skipped]
        if self.bad_lines:
            lines.append(f"{len(self.bad_lines)} bad JSONL line(s) skipped:")
            lines += [f"  {b}" for b in self.bad_lines[:20]] + (["  ..."] if len(self.bad_lines) > 20 else [])
        if self.ignored:
            lines.append(f"{len(self.ignored)} file(s) of other types ignored")
        return "\n".join(lines)


@dataclass
class _Pending:
    """A file read and chunked, waiting for its new chunks' embeddings (`todo`: their positions)."""

    path: Path
    source: str
    doc_id: int | None  # None: not in the index yet
    digest: str
    size: int
    chunks: list[Chunk]
    hashes: list[str]
    old: dict[str, bytes]  # sha256 -> embedding of the chunks the index holds for this file
    todo: list[int]


class IndexMismatch(ValueError):
    """The index was made with other settings (embedding model, chunk size, format): rebuild it."""


# ---------------------------------------------------------------- the index


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class Index:
    """An open index. `Index.build(path, sources)` creates or updates one from files; `Index.open(path)` opens
    one to search; `add` indexes more files; `search` retrieves chunks."""

    def __init__(self, db: sqlite3.Connection, path: Path, embedder: EmbedderLike, meta: dict[str, str],
                 writable: bool) -> None:
        self.db, self.path, self.embedder, self.meta, self.writable = db, path, embedder, meta, writable
        self.chunk_tokens, self.overlap = int(meta["chunk_tokens"]), int(meta["overlap"])
        self._matrix: tuple[np.ndarray, np.ndarray] | None = None  # (chunk ids, (N, dim) embeddings), cached
        self.report: IndexReport | None = None  # what `build` did

    # ---- opening

    @classmethod
    def open(cls, path: str | os.PathLike, embedder: EmbedderLike | None = None, writable: bool = False) -> Index:
        """An existing index; `embedder` defaults to the one it was built with and must have the same id."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such index (make one with `lmforge rag index DOCS --out {path}`)")
        uri = path.resolve().as_uri() + ("" if writable else "?mode=ro")
        db = _connect(uri)
        meta = _read_meta(db, path)
        embedder = embedder or _recorded_embedder(meta)
        _check(meta, path, embedder, int(meta["chunk_tokens"]), int(meta["overlap"]))
        return cls(db, path, embedder, meta, writable)

    @classmethod
    def create(cls, path: str | os.PathLike, embedder: EmbedderLike | None = None,
               chunk_tokens: int = DEFAULT_CHUNK_TOKENS, overlap: int = DEFAULT_OVERLAP) -> Index:
        """A new, empty index at `path` (which must not exist, or be an empty file), open for `add`."""
        path = Path(path)
        if path.exists() and path.stat().st_size:
            raise FileExistsError(f"{path}: exists already (use Index.open or Index.build)")
        if chunk_tokens < 8 or not 0 <= overlap <= chunk_tokens // 2:
            raise ValueError(f"chunk_tokens must be >= 8 and 0 <= overlap <= chunk_tokens / 2, got {chunk_tokens} "
                             f"and {overlap}")
        embedder = embedder or Embedder()
        db = _connect(str(path))
        meta = {"schema": SCHEMA, "analyser": ANALYSER, "embedder": embedder.name, "embedder_id": embedder.id,
                "embedder_path": str(getattr(embedder, "folder", "")), "dim": str(embedder.dim),
                "chunk_tokens": str(chunk_tokens), "overlap": str(overlap)}
        with _transaction(db):
            for stmt in _TABLES.strip().split(";\n"):
                db.execute(stmt)
            db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        return cls(db, path, embedder, meta, writable=True)

    @classmethod
    def build(cls, path: str | os.PathLike, sources: Sequence[str | os.PathLike], *,
              embedder: EmbedderLike | None = None, chunk_tokens: int | None = None, overlap: int | None = None,
              rebuild: bool = False, progress: bool = False) -> Index:
        """Makes the index at `path` hold exactly the documents found in `sources` (files, globs, folders):
        new and changed files are (re-)embedded, unchanged ones kept, deleted ones removed; unreadable ones are
        skipped and counted, keeping what was indexed from them. `chunk_tokens`/`overlap` default to the
        index's own (or 128/24 for a new one); other settings than the index's are an `IndexMismatch` unless
        `rebuild`. The returned index (open to search) has the run's `IndexReport` as `.report`."""
        t0 = time.perf_counter()
        path = Path(path)
        files, ignored = find_documents([str(s) for s in sources])
        work = path.with_name(path.name + ".building")
        lock = _lock(work)
        try:
            try:
                index = cls._working_copy(path, work, embedder, chunk_tokens, overlap, rebuild)
            except BaseException:
                if not work.stat().st_size:  # nothing of an interrupted run in it
                    work.unlink()
                raise
            report = IndexReport(ignored=[_display(f.resolve()) for f in ignored])
            try:
                index.add(files, report, progress=progress)
                index._remove_except(files, report)
                empty = not index.count()[0]
            finally:
                index.close()
            if empty:  # no progress worth keeping
                work.unlink()
                raise DataError("nothing to index: every file was skipped\n" + report.summary())
            os.replace(work, path)  # the complete index replaces the old one in one step
            _fsync_dir(path.parent)
        finally:
            os.close(lock)
        report.seconds = time.perf_counter() - t0
        out = cls.open(path, index.embedder)
        out.report = report
        return out

    @classmethod
    def _working_copy(cls, path: Path, work: Path, embedder: EmbedderLike | None, chunk_tokens: int | None,
                      overlap: int | None, rebuild: bool) -> Index:
        """The index to update at `work`: an interrupted run's copy (resumed), else a copy of the index at
        `path`, else a new one."""
        resumed = work.stat().st_size > 0 and not rebuild
        if not resumed:
            _clear(work)
            if rebuild or not path.exists():
                return cls.create(work, embedder, chunk_tokens or DEFAULT_CHUNK_TOKENS,
                                  DEFAULT_OVERLAP if overlap is None else overlap)
            src = _connect(path.resolve().as_uri() + "?mode=ro")
            dst = sqlite3.connect(work)
            try:
                src.backup(dst)
            finally:
                src.close()
                dst.close()
        where = Path(f"{work} (left by an interrupted run, now discarded)") if resumed else path
        db = _connect(str(work))
        try:
            meta = _read_meta(db, where)
            embedder = embedder or _recorded_embedder(meta)
            _check(meta, where, embedder, chunk_tokens or int(meta["chunk_tokens"]),
                   int(meta["overlap"]) if overlap is None else overlap)
        except BaseException:
            db.close()
            _clear(work)
            raise
        return cls(db, work, embedder, meta, writable=True)

    # ---- writing

    def add(self, files: Sequence[str | os.PathLike], report: IndexReport | None = None,
            progress: bool = False) -> IndexReport:
        """Indexes `files` (new or changed since indexed; unchanged ones are left). Chunks of several files are
        embedded together (4 of the embedder's batches at a time), then each file is written in a transaction
        of its own."""
        if not self.writable:
            raise ValueError(f"{self.path}: opened read-only; use Index.open(path, writable=True)")
        report = report if report is not None else IndexReport()
        pending: list[_Pending] = []
        flush_at = 4 * getattr(self.embedder, "batch_size", 64)
        for f in tqdm([Path(f).resolve() for f in files], desc="indexing", unit="file", disable=not progress):
            doc = self._prepare(f, report)
            if doc is not None:
                pending.append(doc)
            if sum(len(d.todo) for d in pending) >= flush_at:
                self._write(pending, report)
                pending = []
        self._write(pending, report)
        return report

    def _prepare(self, f: Path, report: IndexReport) -> _Pending | None:
        """A new or changed file read and chunked, with the embeddings its unchanged chunks already have; None
        when the file is unchanged or unreadable (counted in `report`)."""
        source = _display(f)
        try:
            data = f.read_bytes()
        except OSError as e:
            report.skipped.append((source, f"cannot read ({e.strerror})"))
            return None
        digest = _sha256(data)
        row = self.db.execute("SELECT id, sha256 FROM documents WHERE path = ?", (str(f),)).fetchone()
        if row is not None and row[1] == digest:
            report.unchanged.append(source)
            return None
        try:
            chunks = chunk_sections(read_document(f, report.bad_lines), self.embedder.token_offsets,
                                    self.chunk_tokens, self.overlap, markdown=f.suffix.lower() in MARKUP)
        except Unreadable as e:
            report.skipped.append((source, str(e)))
            return None
        hashes = [_sha256(c.embed_text) for c in chunks]
        old = {} if row is None else dict(self.db.execute(
            "SELECT sha256, embedding FROM chunks WHERE doc_id = ?", (row[0],)))
        todo = [i for i, h in enumerate(hashes) if h not in old]
        return _Pending(f, source, None if row is None else row[0], digest, len(data), chunks, hashes, old, todo)

    def _write(self, docs: list[_Pending], report: IndexReport) -> None:
        """Embeds the new chunks of `docs` in one call, then writes each document in its own transaction."""
        texts = [d.chunks[i].embed_text for d in docs for i in d.todo]
        vectors = iter(self.embedder.encode(texts)) if texts else iter(())
        for d in docs:
            blobs = dict(d.old) | {d.hashes[i]: next(vectors).astype(np.float32).tobytes() for i in d.todo}
            report.embedded += len(d.todo)
            report.reused += len(d.chunks) - len(d.todo)
            with _transaction(self.db):
                if d.doc_id is None:
                    doc_id = self.db.execute(
                        "INSERT INTO documents (path, source, sha256, bytes, n_chunks) VALUES (?, ?, ?, ?, ?)",
                        (str(d.path), d.source, d.digest, d.size, len(d.chunks))).lastrowid
                else:
                    doc_id = d.doc_id
                    self._delete_chunks(doc_id)
                    self.db.execute("UPDATE documents SET source = ?, sha256 = ?, bytes = ?, n_chunks = ? "
                                    "WHERE id = ?", (d.source, d.digest, d.size, len(d.chunks), doc_id))
                for i, (c, h) in enumerate(zip(d.chunks, d.hashes)):
                    cid = self.db.execute(
                        "INSERT INTO chunks (doc_id, ord, location, heading, text, n_tokens, sha256, embedding) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (doc_id, i, c.location, c.heading, c.text, c.n_tokens, h, blobs[h])).lastrowid
                    self.db.execute("INSERT INTO chunks_fts (rowid, terms) VALUES (?, ?)",
                                    (cid, " ".join(terms(c.embed_text))))
            (report.added if d.doc_id is None else report.updated).append(d.source)
            self._matrix = None

    def _delete_chunks(self, doc_id: int) -> None:
        self.db.execute("DELETE FROM chunks_fts WHERE rowid IN (SELECT id FROM chunks WHERE doc_id = ?)", (doc_id,))
        self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))

    def _remove_except(self, files: Sequence[Path], report: IndexReport) -> None:
        """Removes the documents whose files are not among `files` (deleted, or no longer in the sources)."""
        keep = {str(Path(f).resolve()) for f in files}
        gone = [(i, s) for i, p, s in self.db.execute("SELECT id, path, source FROM documents") if p not in keep]
        if gone:
            with _transaction(self.db):
                for doc_id, source in gone:
                    self._delete_chunks(doc_id)
                    self.db.execute("DELETE FROM documents WHERE id = ?", (doc_id,))
                    report.removed.append(source)
            self._matrix = None

    # ---- reading

    def count(self) -> tuple[int, int]:
        """(documents, chunks)."""
        return (self.db.execute("SELECT COUNT(*) FROM documents").fetchone()[0],
                self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])

    def documents(self) -> dict[str, int]:
        """{source: number of chunks} of every indexed document."""
        return dict(self.db.execute("SELECT source, n_chunks FROM documents ORDER BY source"))

    def search(self, query: str, k: int = 5, mode: str = "hybrid") -> list[Hit]:
        """The `k` best chunks for `query`: `bm25`, `dense` or `hybrid` (both, by reciprocal rank fusion)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if k < 1:
            return []
        if mode == "bm25":
            ranked = self._bm25(query, k)
        elif mode == "dense":
            ranked = self._dense(query, k)
        else:
            depth = max(4 * k, 40)
            fused: dict[int, float] = {}
            for ranking in (self._bm25(query, depth), self._dense(query, depth)):
                for rank, (cid, _) in enumerate(ranking, 1):
                    fused[cid] = fused.get(cid, 0.0) + 1.0 / (RRF_K + rank)
            ranked = sorted(fused.items(), key=lambda x: -x[1])[:k]
        return self._hits(ranked)

    def idf(self, words: Iterable[str]) -> dict[str, float]:
        """{term: log(1 + chunks / chunks holding it)} for BM25 terms (`terms`), counted by the FTS5 table, so
        under its Porter stems ("means" is counted with "mean"); a term no chunk holds counts as held once."""
        n = max(self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0], 1)
        out = {}
        for w in dict.fromkeys(words):
            held = self.db.execute("SELECT COUNT(*) FROM chunks_fts WHERE chunks_fts MATCH ?", (f'"{w}"',)).fetchone()[0]
            out[w] = math.log(1 + n / max(held, 1))
        return out

    def _bm25(self, query: str, k: int) -> list[tuple[int, float]]:
        q = _match_query(query)
        if q is None:
            return []
        rows = self.db.execute("SELECT rowid, bm25(chunks_fts) AS s FROM chunks_fts WHERE chunks_fts MATCH ? "
                               "ORDER BY s LIMIT ?", (q, k)).fetchall()
        return [(cid, -s) for cid, s in rows]  # FTS5's bm25() is lower-is-better

    def _dense(self, query: str, k: int) -> list[tuple[int, float]]:
        return self._dense_vector(self.embedder.encode([query])[0], k)

    def _dense_vector(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The `k` chunks nearest to a unit `vector` (the matrix of embeddings is read once, then cached)."""
        if self._matrix is None:
            rows = self.db.execute("SELECT id, embedding FROM chunks ORDER BY id").fetchall()
            dim = int(self.meta["dim"])
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            self._matrix = ids, np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(-1, dim)
        ids, matrix = self._matrix
        if not len(ids):
            return []
        scores = matrix @ vector  # (N,) cosine similarities: rows are unit vectors
        top = np.argpartition(-scores, k - 1)[:k] if k < len(ids) else np.arange(len(ids))
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(ids[i]), float(scores[i])) for i in top]

    def _hits(self, ranked: list[tuple[int, float]]) -> list[Hit]:
        if not ranked:
            return []
        marks = ",".join("?" * len(ranked))
        rows = {r[0]: r for r in self.db.execute(
            f"SELECT c.id, d.source, c.location, c.heading, c.text, c.ord FROM chunks c "
            f"JOIN documents d ON d.id = c.doc_id WHERE c.id IN ({marks})", [cid for cid, _ in ranked])}
        return [Hit(source=rows[cid][1], location=rows[cid][2], heading=rows[cid][3], text=rows[cid][4],
                    chunk=rows[cid][5], score=score, chunk_id=cid) for cid, score in ranked]

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- helpers


def _connect(where: str) -> sqlite3.Connection:
    db = sqlite3.connect(where, uri=where.startswith("file:"), isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout = 10000")
    return db


def _read_meta(db: sqlite3.Connection, where: Path) -> dict[str, str]:
    try:
        meta = dict(db.execute("SELECT key, value FROM meta"))
    except sqlite3.DatabaseError as e:
        db.close()
        raise IndexMismatch(f"{where}: not an lmforge RAG index ({e})") from None
    if meta.get("schema") != SCHEMA or meta.get("analyser") != ANALYSER:
        db.close()
        raise IndexMismatch(f"{where}: made by another lmforge version (index format {meta.get('schema')}, "
                            f"terms {meta.get('analyser')!r}); rebuild it with `lmforge rag index ... --rebuild`")
    return meta


def _recorded_embedder(meta: dict[str, str]) -> EmbedderLike:
    """The embedder an index was built with: its recorded folder, or the default model if that moved."""
    folder = meta.get("embedder_path")
    return Embedder(folder) if folder and Path(folder).is_dir() else Embedder()


def _check(meta: dict[str, str], where: Path, embedder: EmbedderLike, chunk_tokens: int, overlap: int) -> None:
    have = (meta["embedder_id"], int(meta["chunk_tokens"]), int(meta["overlap"]))
    if have != (embedder.id, chunk_tokens, overlap):
        raise IndexMismatch(
            f"{where}: made with embedding model {meta['embedder']} ({meta['embedder_id']}) and chunks of "
            f"{have[1]} tokens with {have[2]} overlap; this run asks for {embedder.name} ({embedder.id}) and "
            f"chunks of {chunk_tokens} with {overlap}: use the index's settings, or rebuild it "
            f"(`lmforge rag index ... --rebuild`, which re-embeds every file)")


def _lock(work: Path) -> int:
    """An exclusive lock on the working copy's file (created empty if missing), held for the whole run."""
    while True:
        fd = os.open(work, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(f"{work}: another `lmforge rag index` is updating this index") from None
        try:
            if os.stat(work).st_ino == os.fstat(fd).st_ino:  # not renamed away by the run we waited for
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _clear(work: Path) -> None:
    """Empties the working copy in place (the lock is on its inode) and removes SQLite's side files."""
    for side in (work.with_name(work.name + "-journal"), work.with_name(work.name + "-wal")):
        side.unlink(missing_ok=True)
    os.truncate(work, 0)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
