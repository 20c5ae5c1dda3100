"""LoRA-DPO step: step time and peak memory of lmforge vs TRL's DPOTrainer (+ peft), same model, data and
settings; and lmforge's LoRA-DPO peak memory vs its LoRA-SFT peak on the same batch.

SmolLM2-135M-Instruct written once as a Hugging Face folder that both sides load (as in sft_lora.py), the
product-manual preference pairs, LoRA r=16 alpha=32 dropout 0 on every attention and MLP projection, DPO with
beta 0.1 against the reference = the same model with its adapters switched off (both sides), AdamW lr 1e-4.
lmforge: `PreferenceLoss` + `make_reference` of `recipes/align.py`, then backward, optimizer step, zero_grad.
TRL: `trainer.train()`, each step timed by a callback (on_step_begin -> on_step_end: forward, backward,
optimizer and scheduler step; batch collation and logging are outside, as for lmforge). Both see the same pairs
in the same batches (TRL's sampler set to sequential over the pairs in lmforge's order). Timing rounds alternate
in one process and the first step of each round is left out. Peak memory is each side's own child process' peak
RSS above its state after setup (as in sft_lora.py). The SFT reference for the memory ratio is lmforge's LoRA-SFT
step (its recipe's loss) on the same 2B rows: the chosen and the rejected answers as 2B labelled chats.

What differs: TRL also scores the newline the chat template puts after each answer's <|im_end|> (one token more
per answer; the token ids are otherwise the same, which the script checks); TRL's fused LM head computes the
log-probs in chunks without materializing the (rows, T, vocab) logits; TRL turns gradient checkpointing on by
default, which is off here as lmforge does not checkpoint (--trl-gradient-checkpointing for TRL's default).

    python benchmarks/dpo.py [--rounds 3] [--steps 3] [--batch 4] [--random] [--mem-steps 1]
        [--trl-gradient-checkpointing]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from sft_lora import ALPHA, CHILD_ENV, LR, PEFT_TARGETS, TARGETS, R, load_side, peak_rss_mib, write_model

from lmforge.data.preference import PreferenceDataset, load_preferences
from lmforge.recipes.align import AlignConfig, PreferenceLoss, make_reference
from lmforge.recipes.common import LoRASpec
from lmforge.recipes.sft import masked_lm_loss
from lmforge.tokenizer import Tokenizer
from lmforge.train.optim import build_optimizer

DATA = Path(__file__).resolve().parent.parent / "examples" / "product_manual" / "prefs_train.jsonl"
BETA, MAX_LEN = 0.1, 512


def lmforge_data(folder: Path, args) -> tuple[list[dict], list[int], list]:
    """`args.steps` batches of `args.batch` pairs ((2B, T): chosen rows, then rejected rows) in the order
    lmforge's alignment loop draws them; the file's line numbers of those pairs, and the pairs, in that order."""
    tokenizer = Tokenizer.from_folder(folder)
    pairs, stats = load_preferences(DATA, tokenizer, max_len=MAX_LEN)
    if stats.kept != sum(1 for line in DATA.read_text().splitlines() if line.strip()):
        raise RuntimeError(f"{DATA}: pairs were dropped ({stats}); TRL would see other pairs")
    ds = PreferenceDataset(pairs, tokenizer.pad_id)
    data = [ds.batch(step, args.batch, seed=0) for step in range(args.steps)]
    order = [int(i) for step in range(args.steps) for i in ds.order.indices(step, args.batch, 0)]
    return data, order, [pairs[i] for i in order]


def lmforge_step(model, kind: str) -> Callable[[dict], dict[str, float]]:
    """kind "dpo": the alignment recipe's loss (reference = adapters off); "sft": the SFT recipe's loss on the
    same rows (LM head at the answer positions only)."""
    opt = build_optimizer(model, LR, weight_decay=0.0)
    cfg = AlignConfig(method="dpo", beta=BETA, lora=LoRASpec(enabled=True, r=R, alpha=ALPHA, targets=list(TARGETS)))
    loss_fn = PreferenceLoss(cfg, make_reference(cfg, model, None, 0))

    def step(batch: dict) -> dict[str, float]:
        if kind == "dpo":
            loss, metrics = loss_fn(model, batch)
            loss = loss / batch["n"]
        else:
            loss, metrics = masked_lm_loss(model, batch)
            loss = loss / int((batch["y"] != -100).sum())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"loss": float(loss.detach()), **{k: v / batch["n"] for k, v in metrics.items()}}

    return step


def trl_trainer(folder: Path, order: list[int], args, out_dir: str):
    """A DPOTrainer on the pairs in `order` (one epoch = exactly the lmforge batches), timing each step."""
    import datasets
    import transformers as tf
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    records = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]

    def conversation(r: dict) -> dict:
        prompt = ([{"role": "system", "content": r["system"]}] if r.get("system") is not None else [])
        return {"prompt": [*prompt, {"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}]}

    ds = datasets.Dataset.from_list([conversation(records[i]) for i in order])
    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    cfg = DPOConfig(output_dir=out_dir, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                    max_steps=args.steps, learning_rate=LR, beta=BETA, logging_steps=1, report_to=[], use_cpu=True,
                    bf16=False, save_strategy="no", max_length=MAX_LEN, disable_tqdm=True, seed=0,
                    train_sampling_strategy="sequential",
                    gradient_checkpointing=args.trl_gradient_checkpointing)
    peft_config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=PEFT_TARGETS, bias="none",
                             task_type="CAUSAL_LM")
    timer = step_timer()
    trainer = DPOTrainer(model=model, ref_model=None, args=cfg, train_dataset=ds, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[timer])
    trainer.remove_callback(tf.trainer_callback.PrinterCallback)  # the per-step log lines
    return trainer, timer


def step_timer():
    """A TrainerCallback that records the seconds of each optimizer step of `trainer.train()` and the metrics
    logged at each step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.logs: list[dict] = []
            self._t = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._t)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.logs.append(dict(logs))

    return StepTimer()


def same_tokens(trainer, pairs: list) -> str:
    """How the token sequences TRL trains on compare with lmforge's."""
    same = scored_lm = scored_trl = 0
    for ex, pair in zip(trainer.train_dataset, pairs):
        for (ids, labels), answer in zip(pair, ("chosen_ids", "rejected_ids")):
            same += ex["prompt_ids"] + ex[answer] == ids
            scored_lm += sum(t != -100 for t in labels)
            scored_trl += len(ex[answer])
    return (f"token ids identical in {same}/{2 * len(pairs)} sequences; answer tokens scored: lmforge {scored_lm}, "
            f"TRL {scored_trl} (TRL also scores the newline the chat template puts after each <|im_end|>)")


def child_memory(which: str, folder: Path, args) -> float:
    """Runs `which` alone in a fresh process over the same batches; returns its peak RSS above setup in MiB."""
    cmd = [sys.executable, __file__, "--child", which, "--model-dir", str(folder), "--steps", str(args.mem_steps),
           "--batch", str(args.batch)] + (["--trl-gradient-checkpointing"] if args.trl_gradient_checkpointing else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **CHILD_ENV})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def run_child(args) -> None:
    folder = Path(args.model_dir)
    data, order, _ = lmforge_data(folder, args)
    if args.child == "trl":
        with tempfile.TemporaryDirectory() as out_dir:
            trainer, _ = trl_trainer(folder, order, args, out_dir)
            peak = peak_rss_mib(trainer.train)
    else:
        model = load_side("lmforge", folder)
        step = lmforge_step(model, "dpo" if args.child == "lmforge" else "sft")
        peak = peak_rss_mib(lambda: [step(b) for b in data])
    print(json.dumps({"peak_mib": peak}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="steps per round (the first is left out of the timing)")
    p.add_argument("--batch", type=int, default=4, help="preference pairs per step")
    p.add_argument("--random", action="store_true", help="random smollm2-135m preset instead of the GGUF")
    p.add_argument("--trl-gradient-checkpointing", action="store_true",
                   help="TRL's own default (on); off by default here, as lmforge does not checkpoint")
    p.add_argument("--mem-steps", type=int, default=1,
                   help="steps in each memory child process (the peak comes in the first)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run_child(args)
        return
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step of each round is not timed)")

    import peft
    import transformers
    import trl

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        write_model(folder, args.random)
        data, order, pairs = lmforge_data(folder, args)
        model = load_side("lmforge", folder)
        step = lmforge_step(model, "dpo")
        trainer, timer = trl_trainer(folder, order, args, str(Path(tmp) / "trl"))
        print(same_tokens(trainer, pairs))
        times: dict[str, list[float]] = {"lmforge": [], "trl": []}
        first: dict[str, dict] = {}
        for _ in range(args.rounds):
            for i, b in enumerate(data):
                t = time.perf_counter()
                metrics = step(b)
                if i:
                    times["lmforge"].append(time.perf_counter() - t)
                first.setdefault("lmforge", metrics)
            timer.times.clear()
            trainer.train()
            times["trl"] += timer.times[1:]
            first.setdefault("trl", timer.logs[0])
        lm, tr = first["lmforge"], first["trl"]
        print(f"step 0 (adapters at B = 0): loss lmforge {lm['loss']:.6f} TRL {tr['loss']:.6f}; mean policy "
              f"log-prob of the chosen answers lmforge {lm['logp_chosen']:.4f} TRL {tr['logps/chosen']:.4f}, "
              f"rejected {lm['logp_rejected']:.4f} / {tr['logps/rejected']:.4f}")
        del model, step, trainer
        mem = {k: child_memory(k, folder, args) for k in ("lmforge", "trl", "lmforge-sft")}

    tokens = sum(b["tokens"] for b in data)
    name = "random smollm2-135m preset" if args.random else "SmolLM2-135M-Instruct"
    gc_note = "on" if args.trl_gradient_checkpointing else "off"
    print(f"\nLoRA-DPO, {name}, r={R} alpha={ALPHA:g} on attention + MLP, beta {BETA}, batch {args.batch} pairs "
          f"({tokens / len(data):.0f} non-pad tokens per step on average, lmforge), CPU fp32, "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}, trl {trl.__version__} (gradient checkpointing {gc_note}); "
          f"{args.rounds} rounds x {args.steps} steps, first step of each round not timed")
    print(f"{'':18s}{'step s (median)':>16s}{'min':>8s}{'max':>8s}{'peak MiB':>11s}")
    for k, label in (("lmforge", "lmforge"), ("trl", "TRL DPOTrainer")):
        v = times[k]
        print(f"{label:18s}{statistics.median(v):16.2f}{min(v):8.2f}{max(v):8.2f}{mem[k]:11,.0f}")
    print(f"{'lmforge LoRA-SFT':18s}{'':16s}{'':8s}{'':8s}{mem['lmforge-sft']:11,.0f}   (same {2 * args.batch} rows, "
          "memory only)")
    speed = statistics.median(times["trl"]) / statistics.median(times["lmforge"])
    print(f"\nspeed ratio lmforge / TRL: {speed:.2f}x   memory ratio lmforge / TRL: {mem['lmforge'] / mem['trl']:.2f}x"
          f"   lmforge DPO / SFT memory: {mem['lmforge'] / mem['lmforge-sft']:.2f}x")


if __name__ == "__main__":
    main()
