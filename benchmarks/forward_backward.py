"""Forward + backward + AdamW step: tokens/s and peak memory of lmforge vs transformers.LlamaForCausalLM.

Same config, same weights, same batches; steps alternate between the two in one process (the ratio is the
median of the paired steps' ratios). Peak memory is each framework's own child process' max RSS over the
same steps (CPU has no allocator stats).

    python benchmarks/forward_backward.py [--rounds 4] [--steps 3] [--batch 8] [--seq 256] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from lmforge.config import ModelConfig
from lmforge.kernels import accelerate
from lmforge.model import Transformer

# ~20M parameters, LLaMA-style (GQA 8/4 heads)
CONFIG = dict(vocab_size=16000, dim=384, n_layers=6, n_heads=8, n_kv_heads=4, ffn_dim=1024, max_seq_len=1024)


def hf_pair(device: str):
    """(lmforge model, transformers model) with identical weights."""
    import transformers as tf

    cfg = ModelConfig(**CONFIG)
    torch.manual_seed(0)
    ours = accelerate(Transformer(cfg).to(device))  # the fast modules, as `fit` swaps them in
    hf_cfg = tf.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
                            num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                            intermediate_size=cfg.ffn_dim, max_position_embeddings=cfg.max_seq_len,
                            rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False)
    ref = tf.LlamaForCausalLM(hf_cfg).to(device)
    from lmforge.checkpoint.hf import to_hf

    ref.load_state_dict(to_hf(ours.state_dict(), "llama", cfg), strict=True)
    return ours, ref


def make_step(which: str, model, device: str):
    from lmforge.train.optim import build_optimizer

    # each side as its users run it: lmforge's optimizer (fused AdamW, decay on matrices only) and
    # transformers with torch.optim.AdamW at its defaults
    opt = build_optimizer(model, 1e-4) if which == "lmforge" else torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        if which == "lmforge":
            loss, n = model(x, labels=y)  # LM head + cross-entropy in blocks, as the pretrain recipe runs it
            loss = loss / n
        else:  # transformers' own loss path, as its users call it (labels = inputs, shifted inside)
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def batches(args, device):
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, CONFIG["vocab_size"], (args.steps, args.batch, args.seq + 1), generator=g)
    return [(d[:, :-1].to(device), d[:, 1:].to(device)) for d in data]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child_memory(which: str, args) -> float:
    """Runs `which` alone in a fresh process; returns its peak RSS in MiB."""
    out = subprocess.run([sys.executable, __file__, "--child", which, "--steps", str(args.steps),
                          "--batch", str(args.batch), "--seq", str(args.seq), "--device", args.device],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", default=None)
    args = p.parse_args()

    if args.child:  # memory measurement: one framework, fresh process
        ours, ref = hf_pair(args.device)
        model = ours if args.child == "lmforge" else ref
        del ours, ref
        import gc
        import threading

        gc.collect()
        step = make_step(args.child, model, args.device)
        data = batches(args, args.device)
        base, peak, running = _rss_mib(), [0.0], [True]

        def sample() -> None:  # RSS high-water mark above the state after building the model and data
            while running[0]:
                peak[0] = max(peak[0], _rss_mib())
                time.sleep(0.002)

        t = threading.Thread(target=sample)
        t.start()
        for x, y in data:
            step(x, y)
        running[0] = False
        t.join()
        print(json.dumps({"peak_mib": peak[0] - base}))
        return

    ours, ref = hf_pair(args.device)
    n_params = sum(p.numel() for p in ours.parameters())
    data = batches(args, args.device)
    steps = {"lmforge": make_step("lmforge", ours, args.device), "transformers": make_step("transformers", ref, args.device)}
    for name, step in steps.items():  # warm-up, and the two agree on the loss
        print(f"{name:12s} first-step loss {step(*data[0]):.5f}")
    # one step of each, alternating (and swapping which goes first), so that both see the same machine: a
    # shared CPU's speed drifts by +-15% within seconds; the ratio is the median of the paired steps' ratios
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.rounds):
        for i, (x, y) in enumerate(data):
            order = list(steps) if (r + i) % 2 == 0 else list(steps)[::-1]
            for name in order:
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t = time.perf_counter()
                steps[name](x, y)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[name].append(args.batch * args.seq / (time.perf_counter() - t))
    mem = {k: child_memory(k, args) for k in steps}
    print(f"\n{n_params / 1e6:.1f}M-parameter LLaMA, batch {args.batch} x {args.seq}, {args.device}, fp32 eager, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'':14s}{'tokens/s (median)':>20s}{'min':>10s}{'max':>10s}{'peak MiB':>12s}")
    for k in steps:
        print(f"{k:14s}{statistics.median(times[k]):20,.0f}{min(times[k]):10,.0f}{max(times[k]):10,.0f}{mem[k]:12,.0f}")
    pairs = [a / b for a, b in zip(times["lmforge"], times["transformers"])]
    print("paired ratios:", " ".join(f"{p:.2f}" for p in pairs))
    ratio = statistics.median(pairs)
    print(f"\nspeed ratio lmforge / transformers (median of {len(times['lmforge'])} paired steps): {ratio:.2f}x   "
          f"memory ratio: {mem['lmforge'] / mem['transformers']:.2f}x")


if __name__ == "__main__":
    main()
