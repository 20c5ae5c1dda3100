"""The quickstart's fine-tuning and alignment data: arithmetic questions in the phrasings of the demo corpus
(`lmforge.data.demo`), generated from a seed. Validation uses (a, b) pairs that fine-tuning never sees: the
pretraining corpus states them, so answering them shows SFT teaching the format while the knowledge comes
from pretraining."""

from __future__ import annotations

import hashlib
import random
import re
from typing import Any

from lmforge.data.demo import MAX_OPERAND, arithmetic, operands

VAL_FRACTION = 0.1


def is_val(a: int, b: int, op: str) -> bool:
    """A fixed ~10% of all (a, op, b) questions, held out for validation whatever the seed."""
    h = hashlib.blake2b(f"{a}{op}{b}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < VAL_FRACTION * 2**64


def _question(rng: random.Random, split: str) -> tuple[int, int, str]:
    while True:
        a, b, op = operands(rng)
        if is_val(a, b, op) == (split == "val"):
            return a, b, op


def _phrase(a: int, b: int, op: str, answer: int, kind: int) -> tuple[str, str]:
    """(prompt, response) in one of the corpus' phrasings: Chinese, English question, bare equation."""
    if kind == 0:
        return f"帮我计算{a}{op}{b}的结果", f"等于{answer}"
    if kind == 1:
        return f"What is {a}{op}{b}?", str(answer)
    return f"{a}{op}{b}=", str(answer)


def _split(split: str) -> str:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return split


def sft_pairs(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """`n` records `{"prompt", "response"}` such as 帮我计算23+20的结果 -> 等于43, What is 23+20? -> 43."""
    rng, split = random.Random(f"sft:{split}:{seed}"), _split(split)
    out = []
    for _ in range(n):
        a, b, op = _question(rng, split)
        prompt, response = _phrase(a, b, op, arithmetic(a, b, op), rng.randrange(3))
        out.append({"prompt": prompt, "response": response})
    return out


_QUESTION = re.compile(r"(\d+)\s*([+-])\s*(\d+)|has (\d+) \w+ and (gets|gives away) (\d+)")


def result_of(prompt: str) -> int | None:
    """The result a prompt asks for (`13+6=`, `帮我计算13+6的结果`, `Alice has 5 apples and gets 3.`), or None."""
    m = _QUESTION.search(prompt)
    if m is None:
        return None
    if m[1] is not None:
        return arithmetic(int(m[1]), int(m[3]), m[2])
    return arithmetic(int(m[4]), int(m[6]), "+" if m[5] == "gets" else "-")


def check(prompt: str, reply: str, exact: bool = True) -> bool:
    """The task's checker. exact: the reply is the answer in the prompt's phrasing (`等于19` for a Chinese
    prompt, `19` otherwise), as fine-tuning teaches; otherwise the first number in the reply is the result (for
    free continuations of the pretrained model)."""
    result = result_of(prompt)
    if result is None:
        return False
    if exact:
        want = f"等于{result}" if prompt.startswith("帮我计算") else str(result)
        return reply.strip().rstrip("。.") == want
    number = re.search(r"\d+", reply)
    return number is not None and int(number[0]) == result


def held_out_pairs() -> list[dict[str, Any]]:
    """Every held-out question in each of the three phrasings, `{"prompt", "response"}` (165): the whole
    validation split, so held-out accuracy is not a small sample's (of 56 prompts, each moved it 1.8 points)."""
    out = []
    for a in range(MAX_OPERAND + 1):
        for b in range(MAX_OPERAND + 1):
            for op in "+-" if a >= b else "+":
                if is_val(a, b, op):
                    out += [dict(zip(("prompt", "response"), _phrase(a, b, op, arithmetic(a, b, op), kind)))
                            for kind in range(3)]
    return out


def wrong_answer(rng: random.Random, correct: int) -> int:
    """A plausible wrong result: off by a few, or by ten (a carry mistake); never negative."""
    while True:
        wrong = correct + rng.choice([-10, -2, -1, 1, 2, 10])
        if wrong >= 0:
            return wrong


def preference_pairs(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """`n` records `{"prompt", "chosen", "rejected"}`: the correct result vs a near miss, same phrasing."""
    rng, split = random.Random(f"pref:{split}:{seed}"), _split(split)
    out = []
    for _ in range(n):
        a, b, op = _question(rng, split)
        kind, c = rng.randrange(3), arithmetic(a, b, op)
        prompt, chosen = _phrase(a, b, op, c, kind)
        rejected = _phrase(a, b, op, wrong_answer(rng, c), kind)[1]
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out
