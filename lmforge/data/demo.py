"""The quickstart's embedded data: arithmetic facts and short sentences, in English and Chinese, generated
from a seed — so the whole path runs anywhere with nothing to download."""

from __future__ import annotations

import json
import random
from pathlib import Path

MAX_OPERAND = 19  # few enough facts (610) that the quickstart's tiny model memorises them while pretraining
NAMES = ["Alice", "Bob", "Carol", "Dave", "小明", "小红", "Erin", "Frank"]
THINGS = [("apples", "个苹果"), ("books", "本书"), ("cats", "只猫"), ("stars", "颗星星"), ("cups", "个杯子")]


def arithmetic(a: int, b: int, op: str) -> int:
    return a + b if op == "+" else a - b


def operands(rng: random.Random) -> tuple[int, int, str]:
    """A random (a, b, op) with 0 <= a, b <= MAX_OPERAND and a non-negative result."""
    a, b, op = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND), rng.choice("+-")
    return (b, a, op) if op == "-" and b > a else (a, b, op)


def fact(rng: random.Random) -> str:
    """One short document: an equation, a worded sum, or a Chinese question with its answer."""
    a, b, op = operands(rng)
    c = arithmetic(a, b, op)
    name, (thing_en, thing_zh) = rng.choice(NAMES), rng.choice(THINGS)
    kind = rng.randrange(5)
    if kind == 0:
        return f"{a}{op}{b}={c}"
    if kind == 1:
        return f"帮我计算{a}{op}{b}的结果：等于{c}"
    if kind == 2:
        verb = "gets" if op == "+" else "gives away"
        return f"{name} has {a} {thing_en} and {verb} {b}. Now {name} has {c} {thing_en}."
    if kind == 3:
        verb = "又得到" if op == "+" else "送出"
        return f"{name}有{a}{thing_zh}，{verb}{b}{thing_zh}，现在有{c}{thing_zh}。"
    return f"Q: What is {a}{op}{b}? A: {c}"


def write_corpus(folder: str | Path, n_docs: int = 20000, seed: int = 0) -> list[Path]:
    """Writes `n_docs` generated documents as jsonl files (one `text` per line); returns the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files = []
    for part in range(2):
        path = folder / f"demo-{part}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(n_docs // 2):
                f.write(json.dumps({"text": fact(rng)}, ensure_ascii=False) + "\n")
        files.append(path)
    return files
