"""`lmforge quickstart`: the whole path on an embedded corpus, on CPU, in minutes.

The run is a list of stages; each takes the state left by the one before (model folder, tokenizer) and
adds a row to the closing table. Fine-tuning and alignment are further stages in the same list. What each
finished stage left is recorded in <out>/quickstart.json, so running the quickstart again skips the stages
whose output is complete, resumes a stage that was stopped from its checkpoint, and redoes the rest; --fresh
starts over."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge import kernels
from lmforge.checkpoint.atomic import write_text_atomic
from lmforge.checkpoint.run import checkpoints
from lmforge.data.demo import write_corpus
from lmforge.recipes.common import ModelSpec, answer_accuracy
from lmforge.recipes.pretrain import PretrainConfig, PretrainData
from lmforge.recipes.pretrain import run as pretrain
from lmforge.train.loop import TrainConfig

SAMPLE_PROMPTS = ["13+6=", "帮我计算13+6的结果：", "Q: What is 17-5? A:", "Alice has 5 apples and gets 3."]
QUICKSTART_MODEL = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=352)


@dataclass
class State:
    out: Path
    device: str
    steps: int = 1000  # pretraining
    sft_steps: int = 300
    align_steps: int = 120
    model_dir: Path | None = None
    rows: list[tuple[str, str, float]] = field(default_factory=list)  # (stage, what it achieved, seconds)
    extra: dict[str, Any] = field(default_factory=dict)


def _every(steps: int, times: int) -> int:
    """An interval that puts `times` evaluations or checkpoints in `steps`, the last on the final step (which
    fit evaluates anyway: 1000 // 3 = 333 would evaluate at step 999 and again at 1000)."""
    return max(1, -(-steps // times))


def _stopped(run_dir: Path) -> bool:
    """Whether a stage's run was stopped part-way (it has checkpoints): it resumes instead of starting over."""
    return bool(checkpoints(run_dir))


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
        train=TrainConfig(max_steps=s.steps, lr=3e-3, warmup_steps=20, eval_every=_every(s.steps, 3),
                          checkpoint_every=_every(s.steps, 2), resume=_stopped(s.out / "pretrain")),
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


def _write_jsonl(path: Path, records: list[dict]) -> str:
    """Writes records (first of each prompt only) as JSONL; returns the path."""
    records = list({r["prompt"]: r for r in reversed(records)}.values())[::-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def stage_sft(s: State) -> str:
    """Full fine-tuning on arithmetic Q&A in chat form; held-out questions never seen in training."""
    from lmforge.data.demo_tasks import sft_pairs
    from lmforge.recipes.sft import ChatData, SFTConfig
    from lmforge.recipes.sft import run as sft

    data = s.out / "tasks"
    cfg = SFTConfig(
        out_dir=str(s.out / "sft"), model=ModelSpec(init_from=str(s.model_dir), device=s.device),
        data=ChatData(train=_write_jsonl(data / "sft_train.jsonl", sft_pairs(3000, seed=1)),
                      val=_write_jsonl(data / "sft_val.jsonl", sft_pairs(80, seed=2, split="val")), max_len=64),
        batch_size=32, eval_batches=4, eval_max_new_tokens=8,
        train=TrainConfig(max_steps=s.sft_steps, lr=1e-3, warmup_steps=10, weight_decay=0.0,
                          eval_every=_every(s.sft_steps, 2), resume=_stopped(s.out / "sft")),
    )
    r = sft(cfg).last_eval
    s.model_dir = Path(cfg.out_dir) / "model"
    return (f"held-out answer accuracy {r['before_exact_match']:.0%} -> {r['after_exact_match']:.0%} "
            f"(n={r['after_n']})")


def stage_align(s: State) -> str:
    """DPO on a correct vs a wrong answer to held-out-style questions; reference = a frozen copy."""
    from lmforge.data.demo_tasks import preference_pairs
    from lmforge.data.sft import eval_prompts
    from lmforge.recipes.align import AlignConfig, PreferenceData
    from lmforge.recipes.align import run as align

    data = s.out / "tasks"
    cfg = AlignConfig(
        out_dir=str(s.out / "align"), model=ModelSpec(init_from=str(s.model_dir), device=s.device),
        data=PreferenceData(train=_write_jsonl(data / "pref_train.jsonl", preference_pairs(1500, seed=3)),
                            val=_write_jsonl(data / "pref_val.jsonl", preference_pairs(80, seed=4, split="val")),
                            max_len=64),
        method="dpo", beta=0.5, batch_size=16, eval_batches=5,
        train=TrainConfig(max_steps=s.align_steps, lr=2e-5, warmup_steps=5, weight_decay=0.0,
                          eval_every=_every(s.align_steps, 2), resume=_stopped(s.out / "align")),
    )
    r = align(cfg).last_eval
    s.model_dir = Path(cfg.out_dir) / "model"
    from lmforge.checkpoint import load

    model, tok = load(s.model_dir, device=s.device)
    acc = answer_accuracy(model, tok, eval_prompts(str(data / "sft_val.jsonl"), tok), 8)["exact_match"]
    return (f"held-out preference accuracy {r['before_pref_acc']:.0%} -> {r['pref_acc']:.0%}, "
            f"reward accuracy {r['reward_acc']:.0%}; answer accuracy after {acc:.0%}")


def stage_chat(s: State) -> str:
    from lmforge.checkpoint import load
    from lmforge.generate import generate

    model, tok = load(s.model_dir, device=s.device)
    print("\ntwo questions to the aligned model, each a new one-turn chat:")
    for q in ("帮我计算12+7的结果", "What is 15-9?"):
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        reply = tok.decode(generate(model, [ids], max_new_tokens=12, tokenizer=tok)[0], skip_special_tokens=True)
        print(f"  user: {q}\n  assistant: {reply}")
    return "2 one-turn chats"


STAGES: list[tuple[str, Callable[[State], str]]] = [
    ("corpus", stage_corpus),
    ("tokenizer + pretrain", stage_pretrain),
    ("samples", stage_samples),
    ("SFT", stage_sft),
    ("align (DPO)", stage_align),
    ("chat", stage_chat),
]


OUTPUTS = ("corpus", "tasks", "pretrain", "sft", "align", "quickstart.json")  # what --fresh removes


def _complete(rec: dict[str, Any]) -> bool:
    """Whether what a recorded stage left is still there: its files, and its model folder."""
    model = rec.get("model_dir")
    return (all(Path(f).is_file() for f in rec.get("extra", {}).get("corpus", []))
            and (model is None or (Path(model) / "config.json").is_file()))


def run(out: str | Path = "runs/quickstart", steps: int = State.steps, device: str = "auto",
        sft_steps: int = State.sft_steps, align_steps: int = State.align_steps, fresh: bool = False) -> State:
    """Runs every stage in order and prints what each achieved. Stages a run before finished (recorded in
    <out>/quickstart.json, with the same step counts, and their output still complete) are skipped; `fresh`
    removes what earlier runs left and starts over."""
    for name, n in (("steps", steps), ("sft-steps", sft_steps), ("align-steps", align_steps)):
        if n < 1:  # checked before any stage runs, not minutes later when its stage starts
            raise ValueError(f"quickstart --{name} must be >= 1, got {n}")
    s = State(Path(out), device, steps, sft_steps, align_steps)
    record = s.out / "quickstart.json"
    if fresh:
        for name in OUTPUTS:
            path = s.out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    s.out.mkdir(parents=True, exist_ok=True)
    runs = {"steps": steps, "sft_steps": sft_steps, "align_steps": align_steps}
    done = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
    if done.get("steps") != runs:  # another size: nothing recorded counts
        done = {"steps": runs, "stages": {}}
    if s.device != "cuda":
        kernels.prebuild(wait=False)  # first run: the CPU kernels compile while the corpus and tokenizer are made
    redo = False
    for name, stage in STAGES:
        rec = done["stages"].get(name)
        if rec is not None and not redo and _complete(rec):
            s.model_dir = Path(rec["model_dir"]) if rec["model_dir"] else s.model_dir
            s.extra.update(rec["extra"])
            print(f"\n== {name} == done by an earlier run (--fresh redoes it): {rec['what']}")
            s.rows.append((name, rec["what"] + " (earlier run)", rec["seconds"]))
            continue
        redo = True  # every later stage builds on this one
        print(f"\n== {name} ==")
        t = time.perf_counter()
        s.rows.append((name, stage(s), time.perf_counter() - t))
        done["stages"][name] = {"what": s.rows[-1][1], "seconds": s.rows[-1][2], "extra": s.extra,
                                "model_dir": str(s.model_dir) if s.model_dir else None}
        write_text_atomic(record, json.dumps(done, indent=1, ensure_ascii=False) + "\n")
    print("\n== quickstart summary ==")
    width = max(len(r[0]) for r in s.rows)
    for name, what, seconds in s.rows:
        print(f"  {name:<{width}}  {seconds:6.1f}s  {what}")
    print(f"\nmodel folder: {s.model_dir}  (try: lmforge chat --model {s.model_dir}; for llama.cpp: "
          f"lmforge convert {s.model_dir} {s.out / 'model.gguf'})")
    return s
