"""Documents -> chunks of at most `max_tokens` tokens with `overlap` tokens shared between neighbours.

A Markdown (or HTML) document is first cut at its headings, so a chunk never spans two sections and
carries its section's heading path ("Manual > Error codes"). Inside a section the text is cut at token
boundaries, preferring (in order) a paragraph break, a line break, a sentence end, a clause mark, a space;
the overlap of the next chunk starts at the strongest such boundary too. Cuts fall only where a new
character starts, so a chunk never splits a character, even with byte-level tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from lmforge.rag.documents import Section

Offsets = Callable[[str], list[tuple[int, int]]]  # text -> (start, end) character span of each token

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_SENTENCE_END = ".!?。！？…"
_CLAUSE = ",;:，；：、)]）"


@dataclass(frozen=True)
class Chunk:
    """One retrievable piece of a document: its text, section heading path, location and token count."""

    text: str
    heading: str
    location: str
    start: int  # character offsets in the section's text
    end: int
    n_tokens: int

    @property
    def embed_text(self) -> str:
        """What is embedded and indexed: the heading path, then the text."""
        return f"{self.heading}\n{self.text}" if self.heading else self.text


def markdown_sections(text: str) -> list[tuple[str, int, int]]:
    """(heading path, start, end) of the body under each heading; the text before the first heading has
    the path "". Headings inside fenced code blocks do not count."""
    out: list[tuple[str, int, int]] = []
    path: list[tuple[int, str]] = []
    start, pos, fenced = 0, 0, False
    for line in text.splitlines(keepends=True):
        if _FENCE.match(line):
            fenced = not fenced
        m = None if fenced else _HEADING.match(line.rstrip("\r\n"))
        if m:
            out.append((" > ".join(h for _, h in path), start, pos))
            level = len(m.group(1))
            path = [(lv, h) for lv, h in path if lv < level] + [(level, m.group(2).strip())]
            start = pos + len(line)
        pos += len(line)
    out.append((" > ".join(h for _, h in path), start, pos))
    return [(h, s, e) for h, s, e in out if text[s:e].strip()]


def _strength(text: str, prev_end: int, start: int) -> int:
    """How good a cut is before the token at `start`, after one ending at `prev_end`: 5 paragraph, 4 line,
    3 sentence, 2 clause, 1 space, 0 inside a word."""
    gap = text[prev_end:start]
    if gap.count("\n") >= 2:
        return 5
    if "\n" in gap:
        return 4
    before = text[prev_end - 1] if prev_end > 0 else ""
    if before and before in _SENTENCE_END:
        return 3
    if before and before in _CLAUSE:
        return 2
    return 1 if gap else 0


def split_text(text: str, offsets: list[tuple[int, int]], max_tokens: int, overlap: int
               ) -> list[tuple[int, int, int]]:
    """(start char, end char, tokens) of each chunk of `text`, given its tokens' character spans."""
    if max_tokens < 1 or not 0 <= overlap <= max_tokens // 2:
        raise ValueError(f"chunks need max_tokens >= 1 and 0 <= overlap <= max_tokens / 2, got {max_tokens} "
                         f"and {overlap}")
    toks = [(s, e) for s, e in offsets if e > s]
    n = len(toks)
    # cut[i]: strength of cutting before token i, or -1 where token i continues token i-1's character
    cut = [-1] + [_strength(text, toks[i - 1][1], toks[i][0]) if toks[i][0] >= toks[i - 1][1] else -1
                  for i in range(1, n)]
    out = []
    s = 0
    while s < n:
        if n - s <= max_tokens:
            out.append((toks[s][0], toks[n - 1][1], n - s))
            break
        lo = s + max(1, max_tokens // 2)
        # the best cut in the window's second half: strongest, then latest
        e = max(range(lo, s + max_tokens + 1), key=lambda i: (cut[i], i))
        if cut[e] < 0:  # no character boundary in the second half: the nearest one before, else after
            e = next((i for i in range(s + max_tokens, s, -1) if cut[i] >= 0), None) or \
                next((i for i in range(s + max_tokens + 1, n) if cut[i] >= 0), n)
        if e == n:
            out.append((toks[s][0], toks[n - 1][1], n - s))
            break
        out.append((toks[s][0], toks[e - 1][1], e - s))
        if overlap:  # the next chunk starts at the strongest boundary among its last `overlap` tokens, earliest
            back = [i for i in range(max(s + 1, e - overlap), e) if cut[i] >= 0]
            s = max(back, key=lambda i: (cut[i], -i)) if back else e
        else:
            s = e
    return out


def chunk_sections(sections: list[Section], offsets: Offsets, max_tokens: int, overlap: int,
                   markdown: bool) -> list[Chunk]:
    """The chunks of a document's sections, in order (Markdown headings split sections further)."""
    chunks = []
    for sec in sections:
        parts = markdown_sections(sec.text) if markdown else [("", 0, len(sec.text))]
        for heading, a, b in parts:
            body = sec.text[a:b]
            for s, e, n in split_text(body, offsets(body), max_tokens, overlap):
                text = body[s:e].strip()
                if text:
                    chunks.append(Chunk(text, heading, sec.location, a + s, a + e, n))
    return chunks
