"""A terminal chat: multi-turn, through the tokenizer's chat template, replies streamed as they are generated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmforge.generate import stream
from lmforge.model import Transformer

HELP = "/reset clears the conversation, /exit (or Ctrl-D) ends it."


def chat_loop(model: Transformer, tokenizer: Any, system: str | None = None, max_new_tokens: int = 512,
              read: Callable[[str], str] | None = None, write: Callable[..., Any] = print, index: Any = None,
              k: int = 3, mode: str = "hybrid", **options: Any) -> list[dict[str, str]]:
    """Reads a user turn with `read`, streams the reply with `write(piece, end="", flush=True)`, repeats.

    With a RAG `index` (`lmforge.rag.Index`) each turn retrieves `k` chunks (`mode`: bm25, dense or hybrid) for
    the user's message and answers from them; the sources are printed after the reply and are not kept in the
    history (the next turn retrieves its own).

    Every turn re-renders and re-prefills the whole conversation (simple, and exact for any template). When
    it no longer fits the context the oldest turns are dropped. `/reset` clears the history (the system
    prompt stays), `/exit` or EOF ends; Ctrl-C stops a reply (what came so far stays in the history), and at
    the prompt ends the chat. `options` are GenerationConfig fields. Returns the history."""
    read = read or input  # looked up per call, so a patched builtins.input is the one used
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    write(HELP)
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            write("")
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            messages = list(base)
            write("(conversation cleared)")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": line})
        hits: list = []
        try:
            if index is None:
                ids = _fit(tokenizer, messages, base, model.config.max_seq_len)
            else:
                ids, hits = _fit_rag(tokenizer, messages, base, model.config.max_seq_len, max_new_tokens,
                                     index.search(text, k, mode))
        except ValueError as e:  # e.g. undecodable bytes typed or piped in: say so and go on chatting
            messages.pop()
            write(f"({e})")
            continue
        if ids is None:
            messages.pop()
            what = "the system prompt and that message do" if base else "that message alone does"
            write(f"({what} not fit the context of {model.config.max_seq_len} tokens)")
            continue
        reply = ""
        try:
            for piece in stream(model, tokenizer, ids, max_new_tokens, **options):
                reply += piece
                write(piece, end="", flush=True)
        except KeyboardInterrupt:  # Ctrl-C during a reply stops the reply, not the conversation
            write(" (stopped)", end="")
        write("")
        if index is not None:
            from lmforge.rag.answers import format_sources

            write("Sources:\n" + format_sources(hits) if hits else "(no source fits the context)")
        messages.append({"role": "assistant", "content": reply})
    return messages


def _fit_rag(tokenizer: Any, messages: list[dict[str, str]], base: list[dict[str, str]], context: int,
             max_new_tokens: int, hits: list) -> tuple[list[int], list]:
    """The templated prompt ids with `hits` as sources of the last message (`rag.answers.fit_prompt`: oldest
    turns dropped first, then the least relevant sources), and the sources kept; dropped turns leave the
    history as in `_fit`."""
    from lmforge.rag.answers import fit_prompt

    ids, kept, dropped = fit_prompt(tokenizer, messages, hits, context, min(max_new_tokens, context // 2))
    del messages[len(base):len(base) + 2 * dropped]
    return ids, kept


def _fit(tokenizer: Any, messages: list[dict[str, str]], base: list[dict[str, str]],
         context: int) -> list[int] | None:
    """The templated prompt ids, dropping the oldest turns until at least one new token fits; None if the
    last user message alone does not fit."""
    while True:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if len(ids) < context:
            return ids
        if len(messages) <= len(base) + 1:
            return None
        del messages[len(base):len(base) + 2]  # the oldest user turn and its reply
