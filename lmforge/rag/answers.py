"""Answers grounded in retrieved chunks, with their sources; and the evaluation of retrieval and answers.

The retrieved chunks become numbered sources in the prompt (`rag_messages`: in the question's turn, or in a
system message), rendered by the model's own chat template and fitted to its context (`fit_prompt`): the
oldest conversation turns are dropped first, then the least relevant sources; the question never is. With
`sentences=N` the sources are the N sentences (or table rows) of the retrieved chunks closest to the question
(`evidence`) instead of whole chunks: a short evidence window that a small model reads more reliably; with
`rerank=True` the model that answers ranks them too (`rerank.question_logprobs`, UPR; off by default). With
`snap=True` the answer is the source sentence the reply draws on, verbatim, or the best-ranked source sentence
where the reply draws on none (`snap_to_source`: extractive grounding, off by default).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lmforge.rag.index import MODES, RRF_K, Hit, Index, terms

PLACEMENTS = ("user", "system")
ASK = "Using only the text above, answer in a few words:"  # user placement: after the sources, before the question
INSTRUCTION = ("Answer the user's question with the facts in the numbered sources below, in a few words. If the "
               "sources do not say, answer that you do not know.")  # system placement: before the sources


def _title(h: Hit) -> str:
    return h.heading or (h.source + (f", {h.location}" if h.location else ""))


def rag_messages(messages: Sequence[dict[str, str]], hits: Sequence[Hit], placement: str = "user"
                 ) -> list[dict[str, str]]:
    """`messages` (the question last) with `hits` (best first) as numbered sources `[n] heading` + text.

    `user` (default): the sources open the last user turn, best last (next to the question), then `ASK` and the
    question — SmolLM2-135M answers 7 of 13 sample questions so, 4 of 13 with the sources in a system message
    (examples/product_manual). `system`: a system message with `INSTRUCTION` and the sources, best first."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    msgs = list(messages)
    if not hits:
        return msgs
    numbered = [f"[{i}] {_title(h)}\n{h.text}" for i, h in enumerate(hits, 1)]
    if placement == "system":
        system = "\n\n".join([INSTRUCTION, "Sources:", *numbered])
        if msgs and msgs[0]["role"] == "system":
            return [{"role": "system", "content": f"{msgs[0]['content']}\n\n{system}"}, *msgs[1:]]
        return [{"role": "system", "content": system}, *msgs]
    question = msgs[-1]["content"]
    msgs[-1] = {"role": "user", "content": "\n\n".join([*reversed(numbered), f"{ASK} {question}"])}
    return msgs


def fit_prompt(tokenizer: Any, messages: list[dict[str, str]], hits: Sequence[Hit], context: int, reserve: int,
               placement: str = "user") -> tuple[list[int], list[Hit], int]:
    """Prompt ids for `messages` (earlier turns, the question last) with `hits` (best first) as sources, leaving
    `reserve` of the `context` tokens for the answer: drops the oldest turns first, then the least relevant
    sources, never the question. Returns (ids, sources kept, turns dropped); a ValueError when the question
    alone leaves no room for a single new token."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    msgs, kept, dropped = list(messages[len(system):]), list(hits), 0
    while True:
        ids = tokenizer.apply_chat_template(rag_messages(system + msgs, kept, placement),
                                            add_generation_prompt=True, tokenize=True)
        if len(ids) + reserve <= context:
            return list(ids), kept, dropped
        if len(msgs) > 1:
            del msgs[:2 if len(msgs) > 2 and msgs[1]["role"] == "assistant" else 1]  # a user turn and its reply
            dropped += 1
        elif kept:
            kept.pop()
        elif len(ids) < context:  # no source fits: the answer gets what room is left
            return list(ids), kept, dropped
        else:
            raise ValueError(f"the question alone ({len(ids)} tokens with the template) does not fit the "
                             f"model's context of {context} tokens")


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])|(?<=[。！？])")
_TABLE_RULE = re.compile(r"[|\-\s:]+")
_LIST_ITEM = re.compile(r"([-*+•]|\d{1,3}[.)])\s+")
_EMPHASIS = re.compile(r"(\*\*|`)(?=\S)(.+?)(?<=\S)\1")


def split_sentences(text: str) -> list[str]:
    """The units `evidence` ranks. Prose is joined across the line breaks that wrap it (a blank line, a
    heading, a list item or a table row ends a paragraph), then cut after a full stop, question or exclamation
    mark that a capital letter, a digit or a quote follows, or after a CJK sentence mark; a colon or semicolon
    does not end a sentence ("The K7 comes in three colours: Graphite, Sand and Moss." stays whole). A table
    row stays whole (its cells belong together); table rules and blank lines are dropped; Markdown emphasis
    (`**bold**`, `` `code` ``) loses its marks, a list item its bullet."""
    paragraphs: list[str] = []
    open_paragraph = False  # whether the next prose line continues the last paragraph
    for line in text.split("\n"):
        line = line.strip()
        if not line or line.startswith("#") or _TABLE_RULE.fullmatch(line):
            open_paragraph = False
            continue
        if line.startswith("|"):
            paragraphs.append(line)
            open_paragraph = False
            continue
        item = _LIST_ITEM.match(line)
        if item:
            line = line[item.end():]
        line = _EMPHASIS.sub(r"\2", line)
        if open_paragraph and not item:
            paragraphs[-1] += " " + line
        else:
            paragraphs.append(line)
        open_paragraph = True
    out = []
    for para in paragraphs:
        out += [para] if para.startswith("|") else [s.strip() for s in _SENTENCE_END.split(para) if s.strip()]
    return out


def evidence(index: Index, question: str, hits: Sequence[Hit], n: int = 5, model: Any = None,
             tokenizer: Any = None) -> list[Hit]:
    """The `n` sentences (`split_sentences`) of `hits` closest to `question`, best first, each a Hit of its chunk:
    same file and chunk number, `heading` its section's own title (the last part of the chunk's heading path),
    `text` the sentence, `score` its score. The score of "section title: sentence": the question's BM25 terms
    it holds (a plural "s" aside), each weighted by its idf in the whole index (`Index.idf`), plus its cosine
    similarity to the question under the index's embedding model (in [-1, 1]: it orders sentences that hold
    the same terms, and outweighs one idf unit at most). Given a `model` (and its `tokenizer`), that ranking and
    how likely the model finds the question after reading "section title: sentence" (`rerank.question_logprobs`,
    UPR) are fused by reciprocal rank. A sentence that overlapping chunks of one section repeat counts once,
    and a piece of a sentence (cut by a chunk's edge) that the neighbouring chunk holds whole is dropped."""
    units, titles, titled = _candidates(hits)
    if not units or n < 1:
        return []
    import numpy as np

    fused = _score(index, question, titled)
    if model is not None:
        from lmforge.rag.rerank import question_logprobs

        upr = np.array(question_logprobs(model, tokenizer, question, titled))
        fused = sum(1.0 / (RRF_K + np.argsort(np.argsort(-s, kind="stable"), kind="stable")) for s in (fused, upr))
    best = np.argsort(-fused, kind="stable")[:n]
    return [Hit(units[i][0].source, units[i][0].location, titles[i], units[i][1], units[i][0].chunk, float(fused[i]),
                units[i][0].chunk_id) for i in best]


def _candidates(hits: Sequence[Hit]) -> tuple[list[tuple[Hit, str]], list[str], list[str]]:
    """The sentences `evidence` ranks: (chunk, sentence) pairs, each one's section title, and "title: sentence"."""
    units: list[tuple[Hit, str]] = []
    seen: set[tuple[str, str]] = set()
    for h in hits:
        for s in split_sentences(h.text):
            if (h.heading, s) not in seen:
                seen.add((h.heading, s))
                units.append((h, s))
    # a sentence cut by a chunk's edge, whole in the overlapping neighbour: only the whole one
    units = [(h, s) for h, s in units if not any(s in t and s != t for g, t in units if g.heading == h.heading)]
    titles = [h.heading.split(" > ")[-1] for h, _ in units]
    return units, titles, [f"{t}: {s}" if t else s for t, (_, s) in zip(titles, units)]


def _score(index: Index, question: str, titled: Sequence[str]):
    """(U,) `evidence`'s score of each "section title: sentence": the index-wide idf of the question's terms it
    holds plus its cosine similarity to the question."""
    import numpy as np

    vectors = index.embedder.encode([question, *titled])  # (1 + U, dim) unit rows
    asked = {_stem(t) for t in terms(question)}
    idf = index.idf(asked)
    lexical = [sum(idf[t] for t in asked & {_stem(w) for w in terms(u)}) for u in titled]
    return np.array(lexical) + vectors[1:] @ vectors[0]


def _stem(term: str) -> str:
    return term[:-1] if len(term) > 3 and term.endswith("s") and not term.endswith("ss") else term


def snap_to_source(reply: str, question: str, sources: Sequence[Hit], fallback: str | None = None) -> str:
    """Extractive grounding: the sentence of `sources` (best first; `split_sentences` of each) that `reply`
    draws on, verbatim, instead of the model's own words; where it draws on none (it echoes the question, or
    says what no source says), `fallback` (`answer` and `evaluate` give the best-ranked source sentence, so a
    snapped answer is always the sources' words), or `reply` itself when no fallback is given.

    The reply's terms (BM25 terms, a plural "s" dropped) that the question does not already contain are what
    it adds; the sentence holding the most of them, each weighted by its idf among the sentences, wins (ties:
    the better-ranked source). So "The K7 has 5 temperature presets." becomes "The K7 has 5 presets: 60, 70,
    80, 90 and 100 °C." — the manual's words, which the reply paraphrased."""
    drawn = _drawn_on(reply, question, sources)
    return drawn if drawn is not None else reply if fallback is None else fallback


def _drawn_on(reply: str, question: str, sources: Sequence[Hit]) -> str | None:
    """`snap_to_source`'s sentence of `sources` that `reply` draws on; None where it draws on none."""
    units = list(dict.fromkeys(u for h in sources for u in split_sentences(h.text)))
    added = {_stem(t) for t in terms(reply)} - {_stem(t) for t in terms(question)}
    held = [{_stem(t) for t in terms(u)} for u in units]
    df: dict[str, int] = {}
    for h in held:
        for t in h:
            df[t] = df.get(t, 0) + 1
    best, top = None, 0.0
    for unit, h in zip(units, held):
        score = sum(math.log(1 + len(units) / df[t]) for t in added & h)
        if score > top:
            best, top = unit, score
    return best


@dataclass
class Answer:
    """A reply and the sources it was given, best first (the numbers in the reply refer to them)."""

    text: str
    sources: list[Hit]
    prompt_tokens: int
    generated: str = ""  # the model's own words, where `text` is the source sentence they drew on (`snap`)


def answer(model: Any, tokenizer: Any, index: Index, question: str, k: int = 3, mode: str = "hybrid",
           max_new_tokens: int = 256, on_piece: Callable[[str], Any] | None = None,
           history: Sequence[dict[str, str]] = (), placement: str = "user", sentences: int = 0,
           snap: bool = False, rerank: bool = False, **options: Any) -> Answer:
    """Retrieves `k` chunks for `question`, answers it from them (streamed to `on_piece` as generated), and
    returns the answer with its sources. `sentences` > 0: the sources are the chunks' `sentences` sentences
    closest to the question (`evidence`), not the whole chunks; `rerank`: ranked with the model's own
    likelihood of the question too (`evidence(..., model=)`, UPR; needs `sentences`). `snap`: the answer is the
    source sentence the reply draws on (`snap_to_source`; the reply, still streamed, is kept as `generated`).
    Where the reply draws on no source sentence, the snapped answer is the best-ranked one (`evidence`).
    `history`: earlier turns of a conversation; `options`: GenerationConfig fields."""
    from lmforge.generate import stream

    _check_rerank(rerank, sentences)
    hits = index.search(question, k, mode)
    if sentences > 0:
        hits = evidence(index, question, hits, sentences, model if rerank else None, tokenizer)
    context = model.config.max_seq_len
    ids, kept, _ = fit_prompt(tokenizer, [*history, {"role": "user", "content": question}], hits, context,
                              reserve=min(max_new_tokens, context // 2), placement=placement)
    text = ""
    for piece in stream(model, tokenizer, ids, max_new_tokens, **options):
        text += piece
        if on_piece is not None:
            on_piece(piece)
    if snap:  # the best-ranked sentence only where the reply draws on none (ranking chunks' sentences embeds)
        drawn = _drawn_on(text, question, kept)
        return Answer(drawn or _best_sentence(index, question, kept, sentences) or text, kept, len(ids), generated=text)
    return Answer(text, kept, len(ids))


def _best_sentence(index: Index, question: str, sources: Sequence[Hit], sentences: int) -> str | None:
    """The best-ranked sentence of `sources`: the first where they are sentences already (`sentences` > 0),
    else the best of the chunks' (`evidence`); None without sources."""
    best = sources[:1] if sentences > 0 else evidence(index, question, sources, 1)
    return best[0].text if best else None


def _check_rerank(rerank: bool, sentences: int) -> None:
    if rerank and sentences < 1:
        raise ValueError("rerank ranks the sentences of the retrieved chunks: give sentences=N (--sentences N) too")


def format_sources(hits: Sequence[Hit]) -> str:
    """`[1] file, chunk 3 (score 0.0325)` per source, one a line."""
    return "\n".join(f"[{i}] {h.cite()} (score {h.score:.4g})" for i, h in enumerate(hits, 1))


# ---------------------------------------------------------------- evaluation


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def read_questions(path: str | os.PathLike) -> list[tuple[list[dict[str, str]], str, str | None]]:
    """(messages before the answer, reference answer, gold source or None) per line of a prompt/response or
    messages JSONL file (the SFT format), with an optional `source` field naming the file that holds the
    answer. A bad line is a DataError naming file:line."""
    from lmforge.data.errors import DataError
    from lmforge.data.sft import LoadStats, chat_from_record, read_records

    def parse(obj: Any) -> tuple[list[dict[str, str]], str | None]:
        source = obj.get("source") if isinstance(obj, dict) else None
        if source is not None and not isinstance(source, str):
            raise DataError(f"'source' is {type(source).__name__}, not a string")
        return chat_from_record(obj), source

    out = []
    for (msgs, source), _ in read_records(path, parse, LoadStats(str(path)), False):
        out.append(([m for m in msgs[:-1]], msgs[-1]["content"], source))
    if not out:
        raise DataError(f"{path}: no questions in it")
    return out


def relevant(hit: Hit, reference: str, source: str | None) -> bool:
    """Gold for retrieval: the chunk comes from the named source file when the data names one, otherwise it
    holds the reference answer (normalised) — the "answer in passage" criterion of open-domain QA."""
    if source is not None:
        return hit.source == source or hit.source.endswith("/" + source.lstrip("./"))
    return _norm(reference) in _norm(f"{hit.heading}\n{hit.text}")


def retrieval_metrics(index: Index, questions: Sequence[tuple[list[dict[str, str]], str, str | None]],
                      k: int = 5, modes: Sequence[str] = MODES) -> dict[str, dict[str, float]]:
    """recall@1, recall@k and MRR@k of each search mode (share of questions with a relevant chunk among the
    first 1 / k; mean of 1 / the first relevant rank), and its mean query time in ms."""
    out = {}
    for mode in modes:
        r1 = rk = mrr = 0.0
        t0 = time.perf_counter()
        for msgs, ref, source in questions:
            hits = index.search(msgs[-1]["content"], k, mode)
            rank = next((i for i, h in enumerate(hits, 1) if relevant(h, ref, source)), None)
            if rank is not None:
                r1 += rank == 1
                rk += 1
                mrr += 1 / rank
        n = len(questions)
        out[mode] = {"recall@1": r1 / n, f"recall@{k}": rk / n, f"mrr@{k}": mrr / n,
                     "ms_per_query": 1000 * (time.perf_counter() - t0) / n}
    return out


def evaluate(model: Any, tokenizer: Any, index: Index, path: str | os.PathLike, k: int = 3, mode: str = "hybrid",
             max_new_tokens: int = 32, baseline: bool = True, modes: Sequence[str] = MODES, recall_at: int = 5,
             batch_size: int = 8, placement: str = "user", sentences: int = 0, snap: bool = False,
             rerank: bool = False) -> dict[str, Any]:
    """Retrieval metrics of every mode (recall@1, recall@`recall_at`, MRR), and greedy answer accuracy (exact /
    contains, as the SFT recipe scores it) without retrieval (`baseline`) and with `k` chunks of `mode` in the
    prompt (or, `sentences` > 0, their `sentences` best sentences: `evidence`, ranked with the model too when
    `rerank`), on the questions in `path`.
    `snap`: also the accuracy of the same replies snapped to the source sentence they draw on, or to the
    best-ranked one where they draw on none (`snap_to_source`, as `answer` snaps: `with_rag_snapped`;
    `snap_fallbacks` replies fell back so), of the replies snapped where they draw on a source and left as they
    are elsewhere (`with_rag_snapped_strict`: the model's choice alone), and of the best-ranked source sentence
    alone, no model (`first_source`: what retrieval gives by itself)."""
    from lmforge.recipes.common import answer_accuracy, greedy_replies, score_answers

    _check_rerank(rerank, sentences)
    questions = read_questions(path)
    result: dict[str, Any] = {"n": len(questions), "k": k, "mode": mode, "sentences": sentences, "rerank": rerank,
                              "gold": "source" if all(s for *_, s in questions) else "answer in chunk",
                              "retrieval": retrieval_metrics(index, questions, recall_at, modes)}
    if baseline:
        plain = [(list(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True)), ref)
                 for m, ref, _ in questions]
        result["without_rag"] = answer_accuracy(model, tokenizer, plain, max_new_tokens, batch_size)
    context = model.config.max_seq_len
    prompts, given = [], []
    for msgs, *_ in questions:
        hits = index.search(msgs[-1]["content"], k, mode)
        if sentences > 0:
            hits = evidence(index, msgs[-1]["content"], hits, sentences, model if rerank else None, tokenizer)
        ids, kept, _ = fit_prompt(tokenizer, msgs, hits, context, min(max_new_tokens, context // 2), placement)
        prompts.append(ids)
        given.append(kept)
    replies = greedy_replies(model, tokenizer, prompts, max_new_tokens, batch_size)
    refs = [ref for _, ref, _ in questions]

    def accuracy(texts: Sequence[str]) -> dict[str, float]:
        return score_answers(texts, refs)

    result["with_rag"] = accuracy(replies)
    result["replies"] = replies
    if snap:
        asked = [msgs[-1]["content"] for msgs, _, _ in questions]
        best = [_best_sentence(index, q, h, sentences) for q, h in zip(asked, given)]
        drawn = [_drawn_on(r, q, h) for r, q, h in zip(replies, asked, given)]  # None: drew on no source
        result["with_rag_snapped"] = accuracy([d or b or r for d, b, r in zip(drawn, best, replies)])
        result["with_rag_snapped_strict"] = accuracy([d or r for d, r in zip(drawn, replies)])
        result["snap_fallbacks"] = sum(d is None and b is not None for d, b in zip(drawn, best))
        result["first_source"] = accuracy([b or "" for b in best])
    return result
