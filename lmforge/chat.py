"""A terminal chat: multi-turn, through the tokenizer's chat template, replies streamed as they are generated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmforge.generate import stream
from lmforge.model import Transformer

HELP = "/reset clears the conversation, /exit (or Ctrl-D) ends it."


def chat_loop(model: Transformer, tokenizer: Any, system: str | None = None, max_new_tokens: int = 512,
              read: Callable[[str], str] = input, write: Callable[..., Any] = print,
              **options: Any) -> list[dict[str, str]]:
    """Reads a user turn with `read`, streams the reply with `write(piece, end="", flush=True)`, repeats.

    Every turn re-renders and re-prefills the whole conversation (simple, and exact for any template). When
    it no longer fits the context the oldest turns are dropped. `/reset` clears the history (the system
    prompt stays), `/exit` or EOF ends; Ctrl-C stops a reply (what came so far stays in the history), and at
    the prompt ends the chat. `options` are GenerationConfig fields. Returns the history."""
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
        try:
            ids = _fit(tokenizer, messages, base, model.config.max_seq_len)
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
        messages.append({"role": "assistant", "content": reply})
    return messages


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
