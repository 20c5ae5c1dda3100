"""Prepare pretraining data: tokenize documents once into token shards, in parallel and resumably.

On disk (`prepare`'s out_dir): `train-NNNNN-KEY.bin` / `val-NNNNN-KEY.bin` (raw uint16 or uint32 tokens,
each document followed by eos), a `part-NNNNN-KEY.json` per part (its commit marker and counts), and
`manifest.json`. A part is one independent, resumable task: a chunk of the inputs whose KEY hashes what it
was made from (files, their sizes and mtimes, tokenizer, split settings).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer as Backend

from lmforge.checkpoint.atomic import atomic_file, write_text_atomic
from lmforge.data.documents import Piece, cut_file, file_bytes, iter_piece, resolve_sources
from lmforge.data.errors import DataError
from lmforge.tokenizer import Tokenizer
from lmforge.utils import progress_bar

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
BYTES_PER_TOKEN = 4  # rough text bytes per token, to size parts before tokenizing
MIN_PART_BYTES = 1 << 20


# ---------------------------------------------------------------- planning


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
    sized = {f: file_bytes(f) for f in files}
    # at most shard_tokens per part, and at least ~64 parts for parallelism (never below 1 MiB each)
    part_bytes = max(MIN_PART_BYTES, min(shard_tokens * BYTES_PER_TOKEN, sum(sized.values()) // 64))
    parts: list[_Part] = []
    for f in files:
        for piece, n in cut_file(f, part_bytes):
            if not parts or parts[-1].nbytes + n > part_bytes:
                parts.append(_Part(len(parts), [], 0))
            parts[-1].pieces.append(piece)
            parts[-1].nbytes += n
    for p in parts:
        stats = [(os.stat(x.path).st_size, os.stat(x.path).st_mtime_ns) for x in p.pieces]
        desc = json.dumps([fingerprint, [asdict(x) for x in p.pieces], stats], sort_keys=True)
        p.key = hashlib.sha256(desc.encode()).hexdigest()
    return parts


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
    """Tokenize one part into its train/val shards, then commit its part json. Each shard is written to a
    temporary and renamed when whole; the json, written only after both, is what makes the part count."""
    backend = backend or _BACKEND
    assert backend is not None
    out, part = Path(job.out_dir), job.part
    counts = {s: {"tokens": 0, "docs": 0} for s in SPLITS}
    skipped: list[str] = []
    skipped_by_file: dict[str, int] = {}
    sources: list[str] = []
    dtype = np.dtype(job.dtype)
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

    with ExitStack() as stack:  # on success both files are closed, then both renamed; on error both removed
        files = {s: stack.enter_context(open(stack.enter_context(atomic_file(out / part.name(s))), "wb"))
                 for s in SPLITS}
        n_chars = 0
        for piece in part.pieces:
            first = last = 0
            n_skipped = len(skipped)
            for doc, line in iter_piece(piece, job.skip_bad_lines, skipped):
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
    meta = {"key": part.key, "tokenizer_hash": job.tokenizer_hash, "sources": sources,
            "skipped_by_file": skipped_by_file, "skipped_examples": skipped[:10],
            **{s: {"file": part.name(s), **counts[s]} for s in SPLITS}}
    _write_json(out / part.name("part"), meta)
    return meta


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


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


def _remove_temporaries(out: Path) -> None:
    """Remove what a killed run left half-written (never committed, so never read): the temporaries of
    `atomic_file`, and the `.tmp` files of versions before it."""
    for name in ("train-*.bin", "val-*.bin", "part-*.json", "manifest.json"):
        for stale in [*out.glob(f".{name}.tmp-*"), *out.glob(f"{name}.tmp")]:
            stale.unlink(missing_ok=True)


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
        _write_json(Path(folder) / "manifest.json", d)

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
    _remove_temporaries(out)
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
    bar = progress_bar(total=sum(p.nbytes for p in parts), initial=sum(p.nbytes for p in parts if p.index in metas),
                       unit="B", unit_scale=True, desc="prepare", disable=progress is False)
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
    if val_fraction > 0 and manifest.docs("val") == 0:
        log.warning("prepare: the validation split of %s is empty: val_fraction %g of %d documents held out none; "
                    "raise it, or train with eval_batches 0", out, val_fraction, manifest.total_docs)
    if manifest.skipped_lines:
        log.warning("prepare: skipped %d bad lines in %d files (see skipped_examples in %s/manifest.json)",
                    sum(manifest.skipped_lines.values()), len(manifest.skipped_lines), out)
    return manifest


def _run_pool(jobs: list[_Job], workers: int, tokenizer_json: str, metas: dict[int, dict[str, Any]],
              bar: Any) -> None:
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
            procs = list(getattr(pool, "_processes", {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for p in procs:
                p.terminate()  # a killed part leaves only temporaries, removed by the next run
            raise


def _merge_counts(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
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
