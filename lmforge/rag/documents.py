"""The user's documents: which files a source names, and the text sections in each file.

`.txt`, `.md`, `.html` and `.pdf` files are one document each; a `.jsonl` file holds one document per line
(its `text` field, read by `lmforge.data.documents`). A file that cannot be read as text (binary, not UTF-8,
a broken or encrypted PDF) raises `Unreadable` with the reason, which the indexer counts as a skip.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from lmforge.data.errors import DataError

FORMATS = (".txt", ".md", ".markdown", ".jsonl", ".html", ".htm", ".pdf")
MARKUP = (".md", ".markdown", ".html", ".htm")  # headings are kept (html is read as Markdown-like text)


class Unreadable(Exception):
    """A file that holds no usable text; the message says why."""


@dataclass(frozen=True)
class Section:
    """Text of one part of a file: the whole file, a PDF page ("p. 3") or a JSONL line ("line 12")."""

    text: str
    location: str = ""


def find_documents(sources: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """(files to index, files ignored for their type) from files, globs and folders (searched recursively).

    A file named directly must have a supported type; a source that names nothing, or folders without a
    single supported file, is an error naming it."""
    files: dict[Path, None] = {}
    ignored: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            if p.suffix.lower() not in FORMATS:
                raise DataError(f"{p}: unsupported file type (use {', '.join(FORMATS)})")
            found = [p]
        else:
            found = sorted(Path(f) for f in glob.glob(str(s), recursive=True) if Path(f).is_file())
        if not found:
            raise DataError(f"{s}: no such file, or an empty folder (nothing to index)")
        ok = [f for f in found if f.suffix.lower() in FORMATS]
        ignored += [f for f in found if f.suffix.lower() not in FORMATS]
        if not ok:
            raise DataError(f"{s}: no {'/'.join(FORMATS)} files in it (nothing to index)")
        files.update((f.resolve(), None) for f in ok)
    return list(files), ignored


def read_document(path: Path, bad_lines: list[str] | None = None) -> list[Section]:
    """The text sections of one file; raises `Unreadable` when there is none. Bad lines of a JSONL file that
    has good ones are appended to `bad_lines` (`file:line: what`)."""
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        sections = _read_pdf(path)
    elif suffix == ".jsonl":
        sections = _read_jsonl(path, bad_lines)
    else:
        text = _read_text(path)
        sections = [Section(html_to_text(text) if suffix in (".html", ".htm") else text)]
    sections = [s for s in sections if s.text.strip()]
    if not sections:
        raise Unreadable("no text in it" + (" (a scanned PDF needs OCR first)" if suffix == ".pdf" else ""))
    return sections


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise Unreadable("a binary file (it holds NUL bytes), not text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise Unreadable(f"not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def _read_jsonl(path: Path, bad_lines: list[str] | None) -> list[Section]:
    from lmforge.data.documents import iter_documents

    bad: list[str] = []
    sections = [Section(text, f"line {line}") for text, line in iter_documents(path, skip_bad_lines=True,
                                                                                skipped=bad)]
    if not sections:
        raise Unreadable(f"no documents ({bad[0] if bad else 'no text fields'})")
    if bad_lines is not None:
        bad_lines += bad
    return sections


def _read_pdf(path: Path) -> list[Section]:
    try:
        from pypdf import PdfReader
    except ImportError as e:
        raise DataError(f"{path}: reading .pdf needs pypdf (pip install 'lmforge[rag]')") from e
    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):  # an empty user password opens many "protected" PDFs
            raise Unreadable("an encrypted PDF (it needs a password)")
        return [Section(_clean_pdf_text(page.extract_text() or ""), f"p. {i}")
                for i, page in enumerate(reader.pages, 1)]
    except Unreadable:
        raise
    except Exception as e:  # pypdf raises many types for a broken file (PdfReadError, ValueError, KeyError...)
        if "crypt" in type(e).__name__.lower() or "password" in str(e).lower():
            raise Unreadable(f"an encrypted PDF that cannot be opened ({e})") from None
        raise Unreadable(f"not a readable PDF ({type(e).__name__}: {e})") from None


def _clean_pdf_text(text: str, wrapped: int = 50) -> str:
    """pypdf's page text with the lines a paragraph was wrapped into joined: a line of `wrapped` or more
    characters that does not end a sentence continues on the next one (headings and list items are short)."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        joined = i + 1 < len(lines) and len(line) >= wrapped and not line.rstrip().endswith(tuple(".!?:;。！？"))
        out.append(line.rstrip() + (" " if joined else "\n"))
    return "".join(out)


class _HTMLText(HTMLParser):
    """HTML as Markdown-like text: headings as `#` lines, blocks separated by blank lines, no scripts."""

    BLOCKS = {"p", "div", "section", "article", "li", "tr", "br", "table", "ul", "ol", "pre", "blockquote",
              "header", "footer", "main", "nav", "dt", "dd", "title"}
    SKIP = {"script", "style", "noscript", "template", "head"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.SKIP:
            self.skip += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self.out.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in self.BLOCKS:
            self.out.append("\n\n" if tag != "br" else "\n")
        elif tag in ("td", "th"):
            self.out.append(" | ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif re.fullmatch(r"h[1-6]", tag) or tag in self.BLOCKS:
            self.out.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.out.append(re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    """The visible text of an HTML page, headings as Markdown `#` lines (so chunks keep their section)."""
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    lines = [line.strip() for line in "".join(parser.out).split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
