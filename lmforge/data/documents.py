"""Pretraining documents: which files a source names, and the documents in them.

A `.txt` file holds documents separated by blank lines, a `.jsonl` file one `text` field per line, a
`.parquet` file a `text` column. Bad input raises `DataError` naming `file:line`. Both `prepare` and
tokenizer training read files through here, so they see the same documents.
"""

from __future__ import annotations

import glob
import json
import mmap
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.errors import DataError, json_problem

FORMATS = (".txt", ".jsonl", ".parquet")
_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")  # a document boundary in .txt files
_BOM = b"\xef\xbb\xbf"

Bad = Callable[[str], None]  # called with a `file:line: what` message for each bad line


@dataclass(frozen=True)
class Piece:
    """A slice of one input file: bytes [start, end) of .txt/.jsonl, row groups [start, end) of .parquet."""

    path: str
    start: int
    end: int
    first_line: int  # line (row, for parquet) number of the slice's first line, 1-based
    whole: bool  # the slice is the whole file (only then is "no documents" an error)


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


def iter_texts(sources: Sequence[str | Path]) -> Iterator[str]:
    """The text of every document in `sources` (files, globs, folders), read as `prepare` reads them: what
    `train_tokenizer` is given. The sources are resolved now, so a missing one fails before any work."""
    files = resolve_sources(sources)
    return (doc for f in files for doc, _ in iter_documents(f))


def iter_documents(
    path: str | Path, *, skip_bad_lines: bool = False, skipped: list[str] | None = None
) -> Iterator[tuple[str, int]]:
    """Yield `(document, line)` from a .txt (blank-line separated), .jsonl (`text` field) or .parquet (`text`
    column) file. Bad input raises `DataError` naming `file:line`; with `skip_bad_lines` it is skipped instead
    and its message appended to `skipped` (so the caller can count and report it)."""
    return iter_piece(_whole_piece(Path(path)), skip_bad_lines, skipped)


def _whole_piece(path: Path) -> Piece:
    if path.suffix not in FORMATS:
        raise DataError(f"{path}: unsupported file type (use {', '.join(FORMATS)})")
    end = _parquet_file(path).metadata.num_row_groups if path.suffix == ".parquet" else path.stat().st_size
    return Piece(str(path), 0, end, 1, True)


def iter_piece(piece: Piece, skip_bad_lines: bool, skipped: list[str] | None) -> Iterator[tuple[str, int]]:
    """`iter_documents` over one slice of a file; a whole file without documents is bad input."""
    n_docs = n_bad = 0

    def bad(msg: str) -> None:
        nonlocal n_bad
        if not skip_bad_lines:
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


def _decode(raw: bytes, where: str, bad: Bad) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad(f"{where}: invalid UTF-8 (byte {e.start} of the line)")
        return None


def _iter_txt(piece: Piece, bad: Bad) -> Iterator[tuple[str, int]]:
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


def _iter_jsonl(piece: Piece, bad: Bad) -> Iterator[tuple[str, int]]:
    for raw, lineno in _lines(piece):
        where = f"{piece.path}:{lineno}"
        line = _decode(raw, where, bad)
        if line is None or not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad(f"{where}: {json_problem(e)}")
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


def _iter_parquet(piece: Piece, bad: Bad) -> Iterator[tuple[str, int]]:
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


# ---------------------------------------------------------------- cutting big files


def file_bytes(path: Path) -> int:
    """Size of a file's text: bytes on disk, or a .parquet's uncompressed row groups."""
    if path.suffix != ".parquet":
        return path.stat().st_size
    meta = _parquet_file(path).metadata
    return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))


def cut_file(path: Path, part_bytes: int) -> list[tuple[Piece, int]]:
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
