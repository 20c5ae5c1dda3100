"""A pretraining step through lmforge's real loop (`fit`: accumulation, clipping, schedule, logging) vs a
plain transformers.LlamaForCausalLM + torch.optim.AdamW loop, same config, weights and batches, CPU.

Rounds alternate between the two in one process; tokens/s is the median over measured steps, the ratio
the median of the rounds' paired ratios. Peak memory is each side's own child process' RSS high-water mark
above its state after building model and data.

    python benchmarks/train_throughput.py [--rounds 6] [--steps 4] [--batch 8] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from forward_backward import CONFIG, _rss_mib, hf_pair  # noqa: E402

from lmforge.recipes.pretrain import lm_loss  # noqa: E402  (the pretrain recipe's loss)
from lmforge.train.loop import TrainConfig, fit  # noqa: E402


def lmforge_run(model, data, steps: int) -> list[float]:
    """tokens/s of each step of a `fit` run over `data` (steps after the first)."""

    def get_batch(step, micro):
        x, y = data[step % len(data)]
        return {"x": x, "y": y, "n": y.numel()}

    with tempfile.TemporaryDirectory() as run_dir:
        fit(model, get_batch, lm_loss, TrainConfig(max_steps=steps, lr=1e-4, warmup_steps=1, progress=False),
            run_dir)
        rows = [json.loads(s) for s in open(Path(run_dir) / "metrics.jsonl")]
    return [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]


def hf_run(model, data, steps: int, opt) -> list[float]:
    """The textbook loop: forward with labels, backward, clip, step, zero_grad."""
    out = []
    for step in range(steps):
        x, _ = data[step % len(data)]
        t = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        out.append(x.numel() / (time.perf_counter() - t))
    return out[1:]


def batches(n: int, batch: int, seq: int):
    g = torch.Generator().manual_seed(0)
    d = torch.randint(0, CONFIG["vocab_size"], (n, batch, seq + 1), generator=g)
    return [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in d]


def child(which: str, args) -> None:
    ours, ref = hf_pair("cpu")
    model = ours if which == "lmforge" else ref
    del ours, ref
    data = batches(args.steps, args.batch, args.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if which == "transformers" else None
    base, peak, running = _rss_mib(), [0.0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.002)

    t = threading.Thread(target=sample)
    t.start()
    lmforge_run(model, data, args.steps) if which == "lmforge" else hf_run(model, data, args.steps, opt)
    running[0] = False
    t.join()
    print(json.dumps({"peak_mib": peak[0] - base}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--child", default=None)
    args = p.parse_args()
    if args.child:
        child(args.child, args)
        return
    ours, ref = hf_pair("cpu")
    data = batches(args.steps, args.batch, args.seq)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4)
    # rounds alternate (swapping which goes first); a shared CPU's speed drifts by +-15% within seconds, so
    # the ratio is the median over rounds of each round's ratio of medians (paired, seconds apart)
    speeds: dict[str, list[float]] = {"lmforge": [], "transformers": []}
    ratios = []
    for r in range(args.rounds):
        runs = {"lmforge": lambda: lmforge_run(ours, data, args.steps),
                "transformers": lambda: hf_run(ref, data, args.steps, opt)}
        got = {k: runs[k]() for k in (list(runs) if r % 2 == 0 else list(runs)[::-1])}
        for k, v in got.items():
            speeds[k] += v
        ratios.append(statistics.median(got["lmforge"]) / statistics.median(got["transformers"]))
    mem = {}
    for k in speeds:
        out = subprocess.run([sys.executable, __file__, "--child", k, "--steps", str(args.steps), "--batch",
                              str(args.batch), "--seq", str(args.seq)], capture_output=True, text=True, check=True)
        mem[k] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    n = sum(p.numel() for p in ours.parameters())
    print(f"\npretraining step, {n / 1e6:.1f}M-parameter LLaMA, batch {args.batch} x {args.seq}, CPU fp32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} alternating rounds")
    print(f"{'':14s}{'tokens/s median':>18s}{'min':>10s}{'max':>10s}{'peak MiB':>12s}")
    for k, v in speeds.items():
        print(f"{k:14s}{statistics.median(v):18,.0f}{min(v):10,.0f}{max(v):10,.0f}{mem[k]:12,.0f}")
    print(f"\nspeed ratio lmforge / transformers (median of {args.rounds} paired rounds): "
          f"{statistics.median(ratios):.2f}x   memory ratio: {mem['lmforge'] / mem['transformers']:.2f}x")


if __name__ == "__main__":
    main()
