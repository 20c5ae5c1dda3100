"""Pretraining data: read documents, tokenize them once into token shards, read them back as packed windows.

On disk (`prepare`'s out_dir): `train-NNNNN-KEY.bin` / `val-NNNNN-KEY.bin` (raw uint16 or uint32 tokens,
each document followed by eos), a `part-NNNNN-KEY.json` per part (its commit marker and counts), and
`manifest.json`. A part is one independent, resumable task: a chunk of the inputs whose KEY hashes what it
was made from (files, their sizes and mtimes, tokenizer, split settings).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import mmap
import os
import re
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer as Backend
from tqdm import tqdm

from lmforge.data.errors import DataError
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMATS = (".txt", ".jsonl", ".parquet")
SPLITS = ("train", "val")
BYTES_PER_TOKEN = 4  # rough text bytes per token, to size parts before tokenizing
MIN_PART_BYTES = 1 << 20
_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")  # a document boundary in .txt files
_BOM = b"\xef\xbb\xbf"


# ---------------------------------------------------------------- reading documents


@dataclass(frozen=True)
class Piece:
    """A slice of one input file: bytes [start, end) of .txt/.jsonl, row groups [start, end) of .parquet."""

    path: str
    start: int
    end: int
    first_line: int  # line (row, for parquet) number of the slice's first line, 1-based
    whole: bool  # the slice is the whole file (only then is "no documents" an error)


def iter_documents(
    path: str | Path, *, skip_bad_lines: bool = False, skipped: list[str] | None = None
) -> Iterator[tuple[str, int]]:
    """Yield `(document, line)` from a .txt (blank-line separated), .jsonl (`text` field) or .parquet (`text`
    column) file. Bad input raises `DataError` naming `file:line`; with `skip_bad_lines` it is skipped instead
    and its message appended to `skipped` (so the caller can count and report it)."""
    return _iter_piece(_whole_piece(Path(path)), skip_bad_lines, skipped)


def _whole_piece(path: Path) -> Piece:
    if path.suffix not in FORMATS:
        raise DataError(f"{path}: unsupported file type (use {', '.join(FORMATS)})")
    end = _parquet_file(path).metadata.num_row_groups if path.suffix == ".parquet" else path.stat().st_size
    return Piece(str(path), 0, end, 1, True)


def _iter_piece(piece: Piece, skip: bool, skipped: list[str] | None) -> Iterator[tuple[str, int]]:
    n_docs = n_bad = 0

    def bad(msg: str) -> None:
        nonlocal n_bad
        if not skip:
            raise DataError(msg)
        n_bad += 1
        if skipped is not None:
            skipped.append(msg)

    reader = {".txt": _iter_txt, ".jsonl": _iter_jsonl, ".parquet": _iter_parquet}[Path(piece.path).suffix]
    for doc, line in reader(piece, bad):
        n_docs += 1
        yield doc, line
    if piece.whole and n_docs == 0 and n_bad == 0:
        bad(f"{piece.path}:1: empty file (no documents)")


def _lines(piece: Piece) -> Iterator[tuple[bytes, int]]:
    """Raw lines of a byte slice with their line numbers."""
    with open(piece.path, "rb") as f:
        f.seek(piece.start)
        pos, lineno = piece.start, piece.first_line
        for raw in f:
            if pos >= piece.end:
                break
            if pos == 0 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            pos += len(raw)
            yield raw, lineno
            lineno += 1


def _decode(raw: bytes, where: str, bad: Any) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad(f"{where}: invalid UTF-8 (byte {e.start} of the line)")
        return None


def _iter_txt(piece: Piece, bad: Any) -> Iterator[tuple[str, int]]:
    lines: list[str] = []
    first = 0
    for raw, lineno in _lines(piece):
        line = _decode(raw, f"{piece.path}:{lineno}", bad)
        if line is None:
            continue
        if line.strip():
            first = first or lineno
            lines.append(line)
        elif lines:
            yield _strip_eol("".join(lines)), first
            lines, first = [], 0
    if lines:
        yield _strip_eol("".join(lines)), first


def _strip_eol(s: str) -> str:
    return s[:-2] if s.endswith("\r\n") else s[:-1] if s.endswith("\n") else s


def _iter_jsonl(piece: Piece, bad: Any) -> Iterator[tuple[str, int]]:
    for raw, lineno in _lines(piece):
        where = f"{piece.path}:{lineno}"
        line = _decode(raw, where, bad)
        if line is None or not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad(f"{where}: malformed JSON ({e.msg} at column {e.colno})")
            continue
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            if not isinstance(obj, dict):
                bad(f"{where}: not a JSON object")
            else:
                bad(f"{where}: " + ("missing 'text' field" if "text" not in obj
                                    else f"'text' is {type(text).__name__}, not a string"))
        elif text:
            yield text, lineno


def _parquet_file(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover
        raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from e
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}:1: not a readable parquet file ({e})") from e


def _iter_parquet(piece: Piece, bad: Any) -> Iterator[tuple[str, int]]:
    pf = _parquet_file(Path(piece.path))
    if "text" not in pf.schema_arrow.names:
        bad(f"{piece.path}:1: no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
        return
    row = piece.first_line
    for rg in range(piece.start, piece.end):
        for text in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist():
            if not isinstance(text, str):
                bad(f"{piece.path}:{row}: 'text' is {type(text).__name__}, not a string (row {row})")
            elif text:
                yield text, row
            row += 1


# ---------------------------------------------------------------- planning


def resolve_sources(sources: Sequence[str | Path]) -> list[Path]:
    """Files named directly, by glob, or found (recursively) in folders; sorted within each source."""
    files: dict[Path, None] = {}
    for s in sources:
        p = Path(s)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in FORMATS)
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(f) for f in glob.glob(str(s), recursive=True) if Path(f).is_file())
        if not found:
            raise DataError(f"{s}: no such file, or no {'/'.join(FORMATS)} files match")
        for f in found:
            if f.suffix not in FORMATS:
                raise DataError(f"{f}: unsupported file type (use {', '.join(FORMATS)})")
            files[f.resolve()] = None
    return list(files)


def _file_pieces(path: Path, part_bytes: int) -> list[tuple[Piece, int]]:
    """Cut one file into pieces of about `part_bytes` at document boundaries; returns (piece, bytes)."""
    if path.suffix == ".parquet":
        meta = _parquet_file(path).metadata
        out, start, row, size, n = [], 0, 1, 0, meta.num_row_groups
        for rg in range(n):
            size += meta.row_group(rg).total_byte_size
            if size >= part_bytes or rg == n - 1:
                out.append((Piece(str(path), start, rg + 1, row, start == 0 and rg == n - 1), size))
                row += sum(meta.row_group(i).num_rows for i in range(start, rg + 1))
                start, size = rg + 1, 0
        return out or [(Piece(str(path), 0, 0, 1, True), 0)]
    size = path.stat().st_size
    if size <= part_bytes:
        return [(Piece(str(path), 0, size, 1, True), size)]
    out, pos, line = [], 0, 1
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        while pos < size:
            target = pos + part_bytes
            if target >= size:
                end = size
            elif path.suffix == ".jsonl":
                nl = mm.find(b"\n", target)
                end = size if nl < 0 else nl + 1
            else:
                m = _BLANK_LINE.search(mm, target)  # type: ignore[call-overload]
                end = size if m is None else m.start() + 1
            out.append((Piece(str(path), pos, end, line, pos == 0 and end == size), end - pos))
            line += mm[pos:end].count(b"\n")
            pos = end
    return out


@dataclass
class _Part:
    index: int
    pieces: list[Piece]
    nbytes: int
    key: str = ""

    def name(self, kind: str) -> str:
        return f"{kind}-{self.index:05d}-{self.key[:10]}" + (".json" if kind == "part" else ".bin")


def _plan(files: list[Path], shard_tokens: int, fingerprint: dict[str, Any]) -> list[_Part]:
    """Group files (or pieces of big files) into parts; the plan depends only on the inputs and settings."""
    sized = {f: (_parquet_bytes(f) if f.suffix == ".parquet" else f.stat().st_size) for f in files}
    # at most shard_tokens per part, and at least ~64 parts for parallelism (never below 1 MiB each)
    part_bytes = max(MIN_PART_BYTES, min(shard_tokens * BYTES_PER_TOKEN, sum(sized.values()) // 64))
    parts: list[_Part] = []
    for f in files:
        for piece, n in _file_pieces(f, part_bytes):
            if not parts or parts[-1].nbytes + n > part_bytes:
                parts.append(_Part(len(parts), [], 0))
            parts[-1].pieces.append(piece)
            parts[-1].nbytes += n
    for p in parts:
        stats = [(os.stat(x.path).st_size, os.stat(x.path).st_mtime_ns) for x in p.pieces]
        desc = json.dumps([fingerprint, [asdict(x) for x in p.pieces], stats], sort_keys=True)
        p.key = hashlib.sha256(desc.encode()).hexdigest()
    return parts


def _parquet_bytes(path: Path) -> int:
    meta = _parquet_file(path).metadata
    return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))


# ---------------------------------------------------------------- tokenizing one part (in a worker)


@dataclass(frozen=True)
class _Job:
    part: _Part
    out_dir: str
    tokenizer_hash: str
    dtype: str
    eos_id: int
    bos_id: int | None
    val_fraction: float
    seed: int
    skip_bad_lines: bool


_BACKEND: Backend | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _BACKEND
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process: processes = cores
    _BACKEND = Backend.from_str(tokenizer_json)


def _is_val(seed: int, path: str, line: int, fraction: float) -> bool:
    """Deterministic per-document split: a hash of (seed, file name, line), stable however files are cut."""
    h = hashlib.blake2b(f"{seed}:{os.path.basename(path)}:{line}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < fraction * 2**64


def _run_part(job: _Job, backend: Backend | None = None) -> dict[str, Any]:
    """Tokenize one part into its train/val shards (`.tmp`, then renamed), then commit its part json."""
    backend = backend or _BACKEND
    assert backend is not None
    out, part = Path(job.out_dir), job.part
    final = {s: out / part.name(s) for s in SPLITS}
    tmp = {s: p.with_name(p.name + ".tmp") for s, p in final.items()}
    counts = {s: {"tokens": 0, "docs": 0} for s in SPLITS}
    skipped: list[str] = []
    skipped_by_file: dict[str, int] = {}
    sources: list[str] = []
    dtype = np.dtype(job.dtype)
    files = {s: open(tmp[s], "wb") for s in SPLITS}  # closed (and renamed or removed) below
    docs: list[str] = []
    splits: list[str] = []

    def flush() -> None:
        flat: dict[str, list[int]] = {s: [] for s in SPLITS}
        for enc, s in zip(backend.encode_batch_fast(docs, add_special_tokens=False), splits):
            ids = flat[s]
            if job.bos_id is not None:
                ids.append(job.bos_id)
            ids.extend(enc.ids)
            ids.append(job.eos_id)
            counts[s]["docs"] += 1
        for s, ids in flat.items():
            if ids:
                np.array(ids, dtype=dtype).tofile(files[s])
                counts[s]["tokens"] += len(ids)
        docs.clear()
        splits.clear()

    n_chars = 0
    try:
        for piece in part.pieces:
            first = last = 0
            n_skipped = len(skipped)
            for doc, line in _iter_piece(piece, job.skip_bad_lines, skipped):
                first, last = first or line, line
                val = job.val_fraction > 0 and _is_val(job.seed, piece.path, line, job.val_fraction)
                docs.append(doc)
                splits.append("val" if val else "train")
                n_chars += len(doc)
                if n_chars >= 1 << 20 or len(docs) >= 4096:
                    flush()
                    n_chars = 0
            sources.append(f"{piece.path}:{first}-{last}" if first else piece.path)
            if len(skipped) > n_skipped:
                skipped_by_file[piece.path] = skipped_by_file.get(piece.path, 0) + len(skipped) - n_skipped
        flush()
        for s in SPLITS:
            files[s].close()
            os.replace(tmp[s], final[s])
    except BaseException:
        for s in SPLITS:
            files[s].close()
            tmp[s].unlink(missing_ok=True)
        raise
    meta = {"key": part.key, "tokenizer_hash": job.tokenizer_hash, "sources": sources,
            "skipped_by_file": skipped_by_file, "skipped_examples": skipped[:10],
            **{s: {"file": final[s].name, **counts[s]} for s in SPLITS}}
    _write_json_atomic(out / part.name("part"), meta)
    return meta


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _done(out: Path, part: _Part, itemsize: int) -> dict[str, Any] | None:
    """The part's metadata if it is complete (json committed, key matches, shards whole), else None."""
    try:
        meta = json.loads((out / part.name("part")).read_text(encoding="utf-8"))
        if meta["key"] != part.key:
            return None
        for s in SPLITS:
            if (out / meta[s]["file"]).stat().st_size != meta[s]["tokens"] * itemsize:
                return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------- manifest + prepare


@dataclass
class ShardInfo:
    file: str
    tokens: int
    docs: int
    sources: list[str]


@dataclass
class Manifest:
    """What `prepare` made: shards per split, the tokenizer they need, and what was skipped."""

    tokenizer_hash: str
    vocab_size: int
    eos_id: int
    dtype: str
    splits: dict[str, list[ShardInfo]]
    skipped_lines: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[str] = field(default_factory=list)
    seed: int = 0
    val_fraction: float = 0.0
    lmforge_version: str = ""

    def tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.splits[split])

    def docs(self, split: str) -> int:
        return sum(s.docs for s in self.splits[split])

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens(s) for s in self.splits)

    @property
    def total_docs(self) -> int:
        return sum(self.docs(s) for s in self.splits)

    def save(self, folder: str | Path) -> None:
        d = asdict(self)
        d["splits"] = {s: {"tokens": self.tokens(s), "docs": self.docs(s), "shards": d["splits"][s]}
                       for s in self.splits}
        d.update(total_tokens=self.total_tokens, total_docs=self.total_docs,
                 skipped_total=sum(self.skipped_lines.values()))
        _write_json_atomic(Path(folder) / "manifest.json", d)

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        path = Path(folder) / "manifest.json"
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            splits = {s: [ShardInfo(**x) for x in v["shards"]] for s, v in d["splits"].items()}
            keys = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "splits"}
            return cls(splits=splits, **keys)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not a prepared data manifest ({e}); run `lmforge prepare` first") from e


def _check_tokenizer(out: Path, tok_hash: str) -> None:
    """Refuse to mix tokenizers in one folder: a different tokenizer needs a new out_dir."""
    for f in [out / "manifest.json", *sorted(out.glob("part-*.json"))]:
        try:
            old = json.loads(f.read_text(encoding="utf-8")).get("tokenizer_hash", tok_hash)
        except (OSError, ValueError, AttributeError):
            continue
        if old != tok_hash:
            raise ValueError(f"{out} holds data prepared with another tokenizer ({f.name}: {old[:12]}…, "
                             f"now {tok_hash[:12]}…); use a new output folder or delete this one")


def prepare(
    sources: Sequence[str | Path],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.01,
    shard_tokens: int = 1 << 24,
    workers: int | None = None,
    skip_bad_lines: bool = False,
    seed: int = 0,
    progress: bool | None = None,
) -> Manifest:
    """Tokenize `sources` (files, globs, folders) once into token shards under `out_dir`.

    Each document is followed by eos (and preceded by bos when the tokenizer adds one); a deterministic hash
    of (seed, file name, line) sends `val_fraction` of documents to the val split. Parts run in `workers`
    processes (default: one per CPU) and are resumable: a re-run skips every part whose shards are complete.
    `shard_tokens` caps the tokens per shard (roughly: parts are cut by bytes before tokenizing, and small
    corpora into ~64 parts for parallelism). A folder holds one tokenizer's data: another one is an error.
    """
    if not (0.0 <= val_fraction <= 1.0 and shard_tokens > 0):
        raise ValueError(f"need 0 <= val_fraction <= 1 and shard_tokens > 0 (got {val_fraction}, {shard_tokens})")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1 (or unset: every core), got {workers}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_hash = tokenizer.hash()
    _check_tokenizer(out, tok_hash)
    dtype = "uint16" if tokenizer.vocab_size < 2**16 else "uint32"
    files = resolve_sources(sources)
    fingerprint = {"tokenizer": tok_hash, "dtype": dtype, "val_fraction": val_fraction, "seed": seed}
    parts = _plan(files, shard_tokens, fingerprint)
    itemsize = np.dtype(dtype).itemsize
    metas: dict[int, dict[str, Any]] = {}
    for p in parts:
        if (m := _done(out, p, itemsize)) is not None:
            metas[p.index] = m
    todo = [p for p in parts if p.index not in metas]
    if metas:
        log.info("prepare: %d of %d parts already done in %s", len(metas), len(parts), out)
    bos_id = tokenizer.bos_id if tokenizer.add_bos else None
    jobs = [_Job(p, str(out), tok_hash, dtype, tokenizer.eos_id, bos_id, val_fraction, seed, skip_bad_lines)
            for p in todo]
    bar = tqdm(total=sum(p.nbytes for p in parts), initial=sum(p.nbytes for p in parts if p.index in metas),
               unit="B", unit_scale=True, desc="prepare", disable=None if progress is None else not progress)
    workers = max(1, min(workers or _n_cpus(), len(jobs)))
    try:
        if workers == 1:
            for job in jobs:
                metas[job.part.index] = _run_part(job, tokenizer.backend)
                bar.update(job.part.nbytes)
        else:
            _run_pool(jobs, workers, tokenizer.backend.to_str(), metas, bar)
    finally:
        bar.close()
    manifest = Manifest(
        tokenizer_hash=tok_hash, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id, dtype=dtype,
        splits={s: [ShardInfo(sources=metas[p.index]["sources"], **metas[p.index][s]) for p in parts]
                for s in SPLITS},
        skipped_lines=_merge_counts(m.get("skipped_by_file", {}) for m in metas.values()),
        skipped_examples=[e for p in parts for e in metas[p.index]["skipped_examples"]][:20],
        seed=seed, val_fraction=val_fraction, lmforge_version=_version(),
    )
    manifest.save(out)
    if manifest.skipped_lines:
        log.warning("prepare: skipped %d bad lines in %d files (see skipped_examples in %s/manifest.json)",
                    sum(manifest.skipped_lines.values()), len(manifest.skipped_lines), out)
    return manifest


def _run_pool(jobs: list[_Job], workers: int, tokenizer_json: str, metas: dict[int, dict[str, Any]],
              bar: tqdm) -> None:
    """Run jobs in worker processes; on the first error, cancel the parts not started and re-raise."""
    # fork on Linux: workers start at once, without re-importing torch; they use only numpy and tokenizers
    ctx = get_context("fork" if sys.platform == "linux" else "spawn")
    env_was = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # inherited by the workers; no tokenizers fork warning
    try:
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(tokenizer_json,))
        futures = {pool.submit(_run_part, job): job for job in jobs}
    finally:
        if env_was is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = env_was
    with pool:
        try:
            for f in as_completed(futures):
                if (err := f.exception()) is not None:
                    pool.shutdown(wait=True, cancel_futures=True)  # parts already running finish and commit
                    raise err
                metas[futures[f].part.index] = f.result()
                bar.update(futures[f].part.nbytes)
        except KeyboardInterrupt:  # Ctrl-C: stop now; a part is committed whole or not at all, so a rerun resumes
            workers = list(getattr(pool, "_processes", {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for p in workers:
                p.terminate()
            raise


def _merge_counts(dicts: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _n_cpus() -> int:
    """CPUs this process may run on (a container's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _version() -> str:
    import lmforge

    return getattr(lmforge, "__version__", "unknown")


# ---------------------------------------------------------------- reading shards back


class SeededOrder:
    """Which items global batch `step` holds: each epoch visits all `n` items once in the order of a permutation
    seeded by (seed, epoch), and rank r takes the r-th contiguous slice — a pure function of (seed, step)."""

    def __init__(self, n: int) -> None:
        if n <= 0:
            raise ValueError("no items to batch")
        self.n = n
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _perm(self, seed: int, epoch: int) -> np.ndarray:
        if (seed, epoch) not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(next(iter(self._perms)))
            self._perms[(seed, epoch)] = np.random.default_rng((seed, epoch)).permutation(self.n)
        return self._perms[(seed, epoch)]

    def indices(self, step: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        per = _per_rank(batch_size, world_size)
        g = step * batch_size + rank * per + np.arange(per, dtype=np.int64)  # global sample numbers
        epoch, pos = g // self.n, g % self.n
        out = np.empty(per, dtype=np.int64)
        for e in np.unique(epoch):
            m = epoch == e
            out[m] = self._perm(seed, int(e))[pos[m]]
        return out

    def in_order(self, batch_size: int, max_batches: int | None = None, rank: int = 0, world_size: int = 1
                 ) -> Iterator[np.ndarray]:
        """Items 0, 1, 2, ... in global batches sliced per rank; the last partial batch only when world_size
        is 1 (so every rank sees the same number of batches)."""
        per = _per_rank(batch_size, world_size)
        n = self.n if max_batches is None else min(self.n, max_batches * batch_size)
        for start in range(0, n, batch_size):
            if start + batch_size > n and world_size > 1:
                break
            yield np.arange(start, min(start + batch_size, n))[rank * per:(rank + 1) * per]


def _per_rank(batch_size: int, world_size: int) -> int:
    if batch_size <= 0 or batch_size % world_size:
        raise ValueError(f"global batch_size {batch_size} must be positive and divisible by world_size "
                         f"{world_size}")
    return batch_size // world_size


class PackedDataset:
    """A split's shards as one token stream, cut into windows of `seq_len + 1` tokens (input, shifted target).

    Window i covers tokens [i*seq_len, (i+1)*seq_len + 1). `batch(step, ...)` is a pure function of
    (seed, step, batch_size): each epoch visits every window once in the order of a seeded permutation, so a
    resumed run at step N gets exactly the batch it would have got.
    """

    def __init__(self, data_dir: str | Path, split: str = "train", seq_len: int = 1024) -> None:
        self.data_dir, self.split, self.seq_len = Path(data_dir), split, seq_len
        self.manifest = Manifest.load(data_dir)
        if split not in self.manifest.splits:
            raise ValueError(f"no split {split!r} in {self.data_dir}/manifest.json")
        self.dtype = np.dtype(self.manifest.dtype)
        self._maps: list[np.memmap] = []
        for s in self.manifest.splits[split]:
            path = self.data_dir / s.file
            if not path.is_file() or path.stat().st_size != s.tokens * self.dtype.itemsize:
                raise DataError(f"{path}: missing or not {s.tokens} tokens long; re-run `lmforge prepare`")
            if s.tokens:
                self._maps.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(s.tokens,)))
        self._ends = np.cumsum([len(m) for m in self._maps], dtype=np.int64)
        self.n_tokens = int(self._ends[-1]) if len(self._ends) else 0
        self.n_windows = max(0, (self.n_tokens - 1) // seq_len)
        if self.n_windows == 0:
            raise DataError(f"{self.data_dir}: the {split} split has {self.n_tokens} tokens, fewer than "
                            f"seq_len + 1 = {seq_len + 1}")
        self.order = SeededOrder(self.n_windows)

    def __len__(self) -> int:
        return self.n_windows

    def window(self, i: int) -> np.ndarray:
        """Tokens [i*seq_len, (i+1)*seq_len + 1) of the stream, read across shard ends."""
        start, n = i * self.seq_len, self.seq_len + 1
        out = np.empty(n, dtype=self.dtype)
        k = int(np.searchsorted(self._ends, start, side="right"))
        off, filled = start - (int(self._ends[k - 1]) if k else 0), 0
        while filled < n:
            take = min(n - filled, len(self._maps[k]) - off)
            out[filled:filled + take] = self._maps[k][off:off + take]
            filled, k, off = filled + take, k + 1, 0
        return out

    def _rows(self, idx: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(np.stack([self.window(int(i)) for i in idx]).astype(np.int64))  # (B, T+1)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()  # (B, T), (B, T)

    def indices(self, step: int, batch_size: int, seed: int = 0, *, rank: int = 0, world_size: int = 1
                ) -> np.ndarray:
        """Window indices of this rank's rows of global batch `step` (a contiguous slice of it)."""
        return self.order.indices(step, batch_size, seed, rank, world_size)

    def batch(self, step: int, batch_size: int, seed: int = 0, *, rank: int = 0, world_size: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64, each (batch_size // world_size, seq_len): this rank's rows of global batch `step`."""
        return self._rows(self.indices(step, batch_size, seed, rank=rank, world_size=world_size))

    def eval_batches(self, batch_size: int, max_batches: int | None = None, *, rank: int = 0,
                     world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Windows 0, 1, 2, ... in order, in global batches sliced per rank like `batch`; the last partial
        batch is kept only when world_size == 1 (so every rank sees the same number of batches)."""
        if batch_size % world_size:
            raise ValueError(f"global batch_size {batch_size} is not divisible by world_size {world_size}")
        n = self.n_windows if max_batches is None else min(self.n_windows, max_batches * batch_size)
        per = batch_size // world_size
        for start in range(0, n, batch_size):
            if start + batch_size > n and world_size > 1:
                break
            idx = np.arange(start, min(start + batch_size, n))[rank * per:(rank + 1) * per]
            yield self._rows(idx)
