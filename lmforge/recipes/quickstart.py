"""`lmforge quickstart`: the whole path on an embedded corpus, on CPU, in minutes.

The run is a list of stages; each takes the state left by the one before (model folder, tokenizer) and
adds a row to the closing table. Fine-tuning and alignment are further stages in the same list. What each
finished stage left is recorded in <out>/quickstart.json, so running the quickstart again skips the stages
whose output is complete, resumes a stage that was stopped from its checkpoint, and redoes the rest; --fresh
starts over."""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge import kernels
from lmforge.checkpoint.atomic import write_text_atomic
from lmforge.checkpoint.run import checkpoints
from lmforge.data.demo import write_corpus
from lmforge.data.demo_tasks import check, wrong_answer
from lmforge.recipes.common import ModelSpec, answer_accuracy
from lmforge.recipes.pretrain import PretrainConfig, PretrainData
from lmforge.recipes.pretrain import run as pretrain
from lmforge.train.loop import TrainConfig

SAMPLE_PROMPTS = ["13+6=", "帮我计算13+6的结果：", "Q: What is 17-5? A:", "Alice has 5 apples and gets 3."]
QUICKSTART_MODEL = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=352)
CHAT_QUESTIONS = ("帮我计算12+7的结果", "What is 15-9?")
# alignment, chosen on the training split (held-out: the training questions neither SFT nor DPO saw): training
# questions drawn for on-policy pairs at the default DPO steps (~730 distinct), answers sampled to each; DPO's
# beta, learning rate and weight of the chosen answers' NLL
ALIGN_PROMPTS, ALIGN_SAMPLES = 1000, 4
ALIGN_BETA, ALIGN_LR, ALIGN_NLL = 1.0, 3e-5, 1.0


@dataclass
class State:
    out: Path
    device: str
    steps: int = 1000  # pretraining
    sft_steps: int = 300
    align_steps: int = 240
    seed: int = 0  # every stage's training seed (the data stays the same)
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
                          checkpoint_every=_every(s.steps, 2), resume=_stopped(s.out / "pretrain"), seed=s.seed),
    )
    result = pretrain(cfg)
    s.model_dir = Path(cfg.out_dir) / "model"
    s.extra["pretrain_ppl"] = result.last_eval["val_ppl"]
    # the untrained model's perplexity: that of its first batch, before any update (no text seen yet)
    return (f"perplexity {math.exp(result.losses[0]):.0f} (untrained) -> {result.last_eval['val_ppl']:.2f} "
            f"(held-out); train loss {result.losses[0]:.2f} -> {result.losses[-1]:.2f}")


def stage_samples(s: State) -> str:
    from lmforge.checkpoint import load
    from lmforge.generate import generate

    model, tok = load(s.model_dir, device=s.device)
    print("\nsample continuations (greedy; ✓/✗: is the first number in it the result):")
    right = 0
    for prompt in SAMPLE_PROMPTS:
        text = tok.decode(generate(model, [tok.encode(prompt)], max_new_tokens=24, tokenizer=tok)[0],
                          skip_special_tokens=True)
        ok = check(prompt, text, exact=False)
        right += ok
        print(f"  {'✓' if ok else '✗'} {prompt!r:36} -> {text!r}")
    return f"{right} of {len(SAMPLE_PROMPTS)} continuations state the right result"


def _unique(records: list[dict]) -> list[dict]:
    """Records with each prompt once (the first)."""
    return list({r["prompt"]: r for r in reversed(records)}.values())[::-1]


def _write_jsonl(path: Path, records: list[dict], key: tuple[str, ...] = ("prompt",)) -> str:
    """Writes records (the first of each `key`, by default each prompt once) as JSONL; returns the path."""
    records = list({tuple(r[k] for k in key): r for r in reversed(records)}.values())[::-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def stage_sft(s: State) -> str:
    """Full fine-tuning on arithmetic Q&A in chat form; held-out questions never seen in training."""
    from lmforge.data.demo_tasks import held_out_pairs, sft_pairs
    from lmforge.recipes.sft import ChatData, SFTConfig
    from lmforge.recipes.sft import run as sft

    data = s.out / "tasks"
    cfg = SFTConfig(
        out_dir=str(s.out / "sft"), model=ModelSpec(init_from=str(s.model_dir), device=s.device),
        data=ChatData(train=_write_jsonl(data / "sft_train.jsonl", sft_pairs(3000, seed=1)),
                      val=_write_jsonl(data / "sft_val.jsonl", held_out_pairs()), max_len=64),
        batch_size=32, eval_batches=6, eval_max_new_tokens=8,
        train=TrainConfig(max_steps=s.sft_steps, lr=1e-3, warmup_steps=10, weight_decay=0.0, seed=s.seed,
                          eval_every=_every(s.sft_steps, 2), resume=_stopped(s.out / "sft")),
    )
    r = sft(cfg).last_eval
    s.model_dir = Path(cfg.out_dir) / "model"
    s.extra["sft_acc"] = r["after_exact_match"]
    return (f"held-out answer accuracy {r['before_exact_match']:.0%} -> {r['after_exact_match']:.0%} "
            f"(n={r['after_n']})")


def on_policy_pairs(model, tok, records: list[dict], samples: int = 4, temperature: float = 1.0, seed: int = 0,
                    batch_size: int = 64) -> tuple[list[dict], dict[str, int]]:
    """Preference pairs from the model's own answers: `samples` sampled replies to each prompt, labelled right
    or wrong by the task's checker; the right answer is chosen and each distinct wrong reply rejected. Only a
    prompt with no wrong sample gets a synthetic near miss as its rejected answer (and one with no right
    sample the reference answer as chosen). Returns (pairs, counts)."""
    from lmforge.generate import generate

    todo = [(i, tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                        tokenize=True)) for i, r in enumerate(records) for _ in range(samples)]
    replies: list[list[str]] = [[] for _ in records]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for k in range(0, len(todo), batch_size):
            chunk = todo[k:k + batch_size]
            outs = generate(model, [ids for _, ids in chunk], max_new_tokens=8, tokenizer=tok,
                            temperature=temperature, seed=seed * 100003 + k)
            for (i, _), out in zip(chunk, outs):
                replies[i].append(tok.decode(out, skip_special_tokens=True).strip())
    model.train(was_training)
    rng, pairs = random.Random(seed), []
    counts = {"prompts": len(records), "samples": len(todo), "right": 0, "on_policy": 0, "synthetic": 0}
    for r, got in zip(records, replies):
        right = [g for g in got if check(r["prompt"], g)]
        wrong = sorted({g for g in got if g and not check(r["prompt"], g)})
        counts["right"] += len(right)
        if not wrong:  # the model never errs here: a synthetic near miss, in the reference's phrasing
            number = int("".join(ch for ch in r["response"] if ch.isdigit()))
            wrong = [r["response"].replace(str(number), str(wrong_answer(rng, number)))]
            counts["synthetic"] += 1
        else:
            counts["on_policy"] += len(wrong)
        pairs += [{"prompt": r["prompt"], "chosen": r["response"], "rejected": w} for w in wrong]
    return pairs, counts


def align_questions(align_steps: int) -> tuple[list[dict], list[dict]]:
    """The training and held-out questions whose sampled answers make the alignment stage's pairs: at the
    default DPO steps ALIGN_PROMPTS drawn training questions and every held-out one; a shorter run (the tests')
    fewer, in proportion to its steps (it reads fewer pairs, and sampling would take most of its time), the
    held-out ones an even spread of the validation split."""
    from lmforge.data.demo_tasks import held_out_pairs, sft_pairs

    share = min(1.0, align_steps / State.align_steps)
    train = _unique(sft_pairs(max(16, round(ALIGN_PROMPTS * share)), seed=5))
    held = held_out_pairs()
    n = max(16, round(len(held) * share))
    return train, [held[i * len(held) // n] for i in range(n)] if n < len(held) else held


def stage_align(s: State) -> str:
    """DPO on the SFT model's own answers: a right one chosen over a wrong one it sampled for the same
    training question (on-policy pairs); reference = a frozen copy; plus the chosen answers' NLL (ALIGN_NLL,
    RPO), which keeps the right answers likely while the wrong ones are pushed down (without it the right ones
    lose likelihood too: at lr 1e-4, 11 points of answer accuracy lost on the tuning questions). Held-out pairs
    are made the same way on the validation questions, which neither SFT nor DPO trains on."""
    from lmforge.checkpoint import load
    from lmforge.data.sft import eval_prompts
    from lmforge.recipes.align import AlignConfig, PreferenceData
    from lmforge.recipes.align import run as align

    data, key = s.out / "tasks", ("prompt", "rejected")
    model, tok = load(s.model_dir, device=s.device)
    questions, held = align_questions(s.align_steps)
    train, n = on_policy_pairs(model, tok, questions, samples=ALIGN_SAMPLES, seed=s.seed)
    val, _ = on_policy_pairs(model, tok, held, samples=ALIGN_SAMPLES, seed=s.seed + 1)
    print(f"on-policy pairs: {n['samples']:,} sampled answers to {n['prompts']:,} training questions, "
          f"{n['right'] / n['samples']:.0%} right; {n['on_policy']:,} pairs with a wrong answer the model gave, "
          f"{n['synthetic']:,} questions it never got wrong with a synthetic one (held out: {len(val)} pairs on "
          f"{len(held)} questions)")
    del model
    cfg = AlignConfig(
        out_dir=str(s.out / "align"), model=ModelSpec(init_from=str(s.model_dir), device=s.device),
        data=PreferenceData(train=_write_jsonl(data / "pref_train.jsonl", train, key),
                            val=_write_jsonl(data / "pref_val.jsonl", val, key), max_len=64),
        method="dpo", beta=ALIGN_BETA, nll_weight=ALIGN_NLL, batch_size=16, eval_batches=math.ceil(len(val) / 16),
        train=TrainConfig(max_steps=s.align_steps, lr=ALIGN_LR, warmup_steps=5, weight_decay=0.0, seed=s.seed,
                          eval_every=_every(s.align_steps, 2), resume=_stopped(s.out / "align")),
    )
    r = align(cfg).last_eval
    s.model_dir = Path(cfg.out_dir) / "model"
    model, tok = load(s.model_dir, device=s.device)
    acc = answer_accuracy(model, tok, eval_prompts(str(data / "sft_val.jsonl"), tok), 8)["exact_match"]
    s.extra["align_acc"], s.extra["align_pref_acc"] = acc, (r["before_pref_acc"], r["pref_acc"])
    return (f"held-out preference accuracy {r['before_pref_acc']:.0%} -> {r['pref_acc']:.0%}; "
            f"answer accuracy {s.extra['sft_acc']:.0%} (SFT) -> {acc:.0%}")


def stage_chat(s: State) -> str:
    from lmforge.checkpoint import load
    from lmforge.generate import generate

    model, tok = load(s.model_dir, device=s.device)
    print("\ntwo questions to the aligned model, each a new one-turn chat (✓/✗: the checker's verdict):")
    right = 0
    for q in CHAT_QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        reply = tok.decode(generate(model, [ids], max_new_tokens=12, tokenizer=tok)[0], skip_special_tokens=True)
        ok = check(q, reply)
        right += ok
        print(f"  user: {q}\n  assistant: {reply}  {'✓' if ok else '✗'}")
    return f"{right} of {len(CHAT_QUESTIONS)} one-turn chats answered right"


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
        sft_steps: int = State.sft_steps, align_steps: int = State.align_steps, fresh: bool = False,
        seed: int = State.seed) -> State:
    """Runs every stage in order and prints what each achieved. Stages a run before finished (recorded in
    <out>/quickstart.json, with the same step counts, and their output still complete) are skipped; `fresh`
    removes what earlier runs left and starts over."""
    for name, n in (("steps", steps), ("sft-steps", sft_steps), ("align-steps", align_steps)):
        if n < 1:  # checked before any stage runs, not minutes later when its stage starts
            raise ValueError(f"quickstart --{name} must be >= 1, got {n}")
    s = State(Path(out), device, steps, sft_steps, align_steps, seed=seed)
    record = s.out / "quickstart.json"
    if fresh:
        for name in OUTPUTS:
            path = s.out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    s.out.mkdir(parents=True, exist_ok=True)
    runs = {"steps": steps, "sft_steps": sft_steps, "align_steps": align_steps, "seed": seed}
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
