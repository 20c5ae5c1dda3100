"""Writes that appear complete or not at all: a temporary sibling, synced to disk, then one rename. A failure
(or a kill) leaves what was there before, and at most a hidden temporary that the next write ignores."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}")


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def _replacing(path: Path, folder: bool) -> Iterator[Path]:
    """Yields a temporary sibling (a file path, or a made folder); on success it is synced and replaces `path`
    in one rename (a folder there is moved aside first, then removed), on error it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*") if folder else [tmp]:  # data on disk before the rename makes it visible
            if f.is_file():
                _fsync(f)
        old = _sibling(path, "old") if folder and path.exists() else None
        if old is not None:
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if folder else tmp.unlink(missing_ok=True)
        raise


def atomic_file(path: str | os.PathLike) -> AbstractContextManager[Path]:
    """Yields a temporary sibling path to write; on success it replaces `path` in one rename, on error it is
    removed and `path` is left as it was."""
    return _replacing(Path(path), folder=False)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`path.write_text(text)` (UTF-8), atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_folder(folder: str | os.PathLike) -> AbstractContextManager[Path]:
    """Yields a temporary sibling folder; on success it replaces `folder` in one rename, on error it is
    removed and `folder` is left as it was."""
    return _replacing(Path(folder), folder=True)
