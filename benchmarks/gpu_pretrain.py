"""bf16 pretraining throughput and MFU on a CUDA GPU, through lmforge's own `fit` loop, compiled.

Two shapes (as in shared/bench/gpu_reference.py, which measures transformers eager/compiled and a minimal
compiled LLaMA on the same shapes — run it in the same call so ratios compare like with like):
  135M: SmolLM2-135M-like (untied head), batch 16 x 2048;   500M: LLaMA dim 1280, 24 layers, GQA 20/4, 8 x 2048.
MFU = tokens/s x (6N + 12 L D T) / measured bf16 matmul peak (N: non-embedding params + the LM head).

    python benchmarks/gpu_pretrain.py [--tiny] [--hf] [--steps 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.train.loop import TrainConfig, fit
from lmforge.train.losses import next_token_loss

SHAPES = {
    "135M": (dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536), 16, 2048),
    "500M": (dict(vocab_size=32000, dim=1280, n_layers=24, n_heads=20, n_kv_heads=4, ffn_dim=3456), 8, 2048),
}
TINY = {"tiny": (dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128), 2, 64)}


def emit(out: str, **kw) -> None:
    print(json.dumps(kw), flush=True)
    with open(os.path.join(out, "gpu_pretrain.jsonl"), "a") as f:
        f.write(json.dumps(kw) + "\n")


def matmul_peak(dev: str) -> float:
    if dev != "cuda":
        return 1e11
    n = 8192
    a, b = torch.randn(n, n, device=dev, dtype=torch.bfloat16), torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 / ((time.perf_counter() - t) / 10)


def flops_per_token(c: ModelConfig, seq: int, n_params: int) -> float:
    n = n_params - 2 * c.vocab_size * c.dim + c.vocab_size * c.dim  # non-embedding + LM head (untied)
    return 6 * n + 12 * c.n_layers * c.dim * seq


def bench(name: str, cfg: dict, batch: int, seq: int, steps: int, dev: str, peak: float, out: str) -> None:
    c = ModelConfig(**cfg, max_seq_len=seq, norm_eps=1e-5)
    torch.manual_seed(0)
    with torch.device(dev):
        model = Transformer(c)
    n_params = model.num_params()
    data = torch.randint(0, c.vocab_size, (batch, seq + 1), device=dev)

    def get_batch(step: int, micro: int) -> dict:
        return {"x": data[:, :-1], "y": data[:, 1:], "n": batch * seq}

    def loss_fn(m, b):
        loss, _ = next_token_loss(m(b["x"]), b["y"])
        return loss, {}

    warm = 3
    with tempfile.TemporaryDirectory() as run_dir:
        t0 = time.perf_counter()
        cfg_t = TrainConfig(max_steps=warm + steps, lr=1e-4, warmup_steps=1, compile=True, progress=False,
                            precision="bf16" if dev == "cuda" else "fp32")
        result = fit(model, get_batch, loss_fn, cfg_t, run_dir)
        total = time.perf_counter() - t0
        rows = [json.loads(s) for s in open(os.path.join(run_dir, "metrics.jsonl"))]
    tps = statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > warm)
    mfu = tps * flops_per_token(c, seq, n_params) / peak
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0
    emit(out, what="train", name=name, params_M=round(n_params / 1e6, 1), batch=batch, seq=seq, tok_s=round(tps),
         mfu=round(mfu, 3), mem_GiB=round(mem, 1), total_s=round(total, 1), loss=round(result.losses[-1], 3))
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="a tiny shape, to check the script on CPU")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=os.environ.get("OUT", tempfile.gettempdir()))
    p.add_argument("--only", default=None, help="comma-separated shape names")
    args = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak(dev)
    emit(args.out, what="matmul_bf16", tflops=round(peak / 1e12, 1),
         gpu=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__)
    shapes = TINY if args.tiny else SHAPES
    for name, (cfg, batch, seq) in shapes.items():
        if args.only and name not in args.only.split(","):
            continue
        try:
            bench(f"lmforge-compiled-{name}", cfg, batch, seq, args.steps, dev, peak, args.out)
        except Exception as e:  # keep measuring the other shape
            emit(args.out, what="error", name=name, err=repr(e)[:500])


if __name__ == "__main__":
    main()
