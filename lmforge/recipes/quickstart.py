"""`lmforge quickstart`: the whole path on an embedded corpus, on CPU, in minutes.

The run is a list of stages; each takes the state left by the one before (model folder, tokenizer) and
adds a row to the closing table. Fine-tuning and alignment are further stages in the same list."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.data.demo import write_corpus
from lmforge.recipes.common import ModelSpec
from lmforge.recipes.pretrain import PretrainConfig, PretrainData
from lmforge.recipes.pretrain import run as pretrain
from lmforge.train.loop import TrainConfig

SAMPLE_PROMPTS = ["23+20=", "帮我计算23+20的结果：", "Q: What is 45-12? A:", "Alice has 5 apples and gets 3."]
QUICKSTART_MODEL = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=352)


@dataclass
class State:
    out: Path
    device: str
    steps: int
    model_dir: Path | None = None
    rows: list[tuple[str, str, float]] = field(default_factory=list)  # (stage, what it achieved, seconds)
    extra: dict[str, Any] = field(default_factory=dict)


def stage_corpus(s: State) -> str:
    files = write_corpus(s.out / "corpus", n_docs=20000)
    s.extra["corpus"] = [str(f) for f in files]
    return f"{sum(1 for f in files for _ in open(f, encoding='utf-8')):,} documents in {len(files)} files"


def stage_pretrain(s: State) -> str:
    cfg = PretrainConfig(
        out_dir=str(s.out / "pretrain"),
        model=ModelSpec(preset="tiny-llama", overrides=QUICKSTART_MODEL, device=s.device),
        data=PretrainData(sources=s.extra["corpus"], vocab_size=768, seq_len=128),
        batch_size=16, eval_batches=10,
        train=TrainConfig(max_steps=s.steps, lr=3e-3, warmup_steps=20, eval_every=max(1, s.steps // 3),
                          checkpoint_every=max(1, s.steps // 2)),
    )
    result = pretrain(cfg)
    s.model_dir = Path(cfg.out_dir) / "model"
    s.extra["pretrain_ppl"] = result.last_eval["val_ppl"]
    return (f"train loss {result.losses[0]:.2f} -> {result.losses[-1]:.2f}, "
            f"validation perplexity {result.last_eval['val_ppl']:.2f}")


def stage_samples(s: State) -> str:
    from lmforge.checkpoint import load
    from lmforge.generate import generate

    model, tok = load(s.model_dir, device=s.device)
    print("\nsample continuations (greedy):")
    for prompt in SAMPLE_PROMPTS:
        new = generate(model, [tok.encode(prompt)], max_new_tokens=24, tokenizer=tok)[0]
        print(f"  {prompt!r:36} -> {tok.decode(new, skip_special_tokens=True)!r}")
    return f"{len(SAMPLE_PROMPTS)} prompts continued"


STAGES: list[tuple[str, Callable[[State], str]]] = [
    ("corpus", stage_corpus),
    ("tokenizer + pretrain", stage_pretrain),
    ("samples", stage_samples),
]


def run(out: str | Path = "runs/quickstart", steps: int = 300, device: str = "auto") -> State:
    """Runs every stage in order and prints what each achieved."""
    s = State(Path(out), device, steps)
    s.out.mkdir(parents=True, exist_ok=True)
    for name, stage in STAGES:
        print(f"\n== {name} ==")
        t = time.perf_counter()
        s.rows.append((name, stage(s), time.perf_counter() - t))
    print("\n== quickstart summary ==")
    width = max(len(r[0]) for r in s.rows)
    for name, what, seconds in s.rows:
        print(f"  {name:<{width}}  {seconds:6.1f}s  {what}")
    print(f"\nmodel folder: {s.model_dir}  (try: lmforge generate --model {s.model_dir} --prompt '23+20=')")
    return s
