"""Which scaled_dot_product_attention backend is fastest for lmforge's GPU shapes: each backend alone
(flash, cuDNN, memory-efficient) and torch's own choice, on the two pretraining shapes of gpu_pretrain.py
(causal, GQA, forward + backward) and on SmolLM2's decode step (one token's 3 query rows per K/V head
against a 512-slot cache, bool mask), bf16. It tells whether pinning a backend would raise the MFU / decode
figures, and what share of a step attention is. Seconds of device time.

    python benchmarks/gpu_attention.py [--reps 20]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"torch's choice": None, "flash": SDPBackend.FLASH_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
# name: (batch, query heads, K/V heads, query rows, keys, head dim, training)
SHAPES = {"135M train 16x2048": (16, 9, 3, 2048, 2048, 64, True),
          "500M train 8x2048": (8, 20, 4, 2048, 2048, 64, True),
          "135M decode, 512 slots": (1, 9, 3, 1, 512, 64, False)}
TINY = {"tiny train": (2, 4, 2, 64, 64, 16, True), "tiny decode": (1, 4, 2, 1, 32, 16, False)}


def timed(fn, reps: int, cuda: bool) -> float:
    """Median seconds of fn() over reps (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def case(shape: tuple, dev: str, dtype: torch.dtype, expand: bool):
    """The call of one shape, as lmforge's Attention makes it (GQA in place, or K/V expanded to every head)."""
    B, H, K, T, S, D, train = shape
    g = torch.Generator(device=dev).manual_seed(0)
    if train:
        q = torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=g, requires_grad=True)
        k, v = (torch.randn(B, K, S, D, device=dev, dtype=dtype, generator=g, requires_grad=True) for _ in "kv")
        grad = torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=g)

        def run():
            kk, vv = (t.repeat_interleave(H // K, 1) for t in (k, v)) if expand else (k, v)
            y = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=not expand and K != H)
            torch.autograd.grad(y, (q, k, v), grad)

        flops = 4 * B * H * T * S * D / 2 * 3.5  # causal half; forward 1 + backward 2.5
        return run, flops
    q = torch.randn(B, K, H // K, D, device=dev, dtype=dtype, generator=g)  # decode: G rows per K/V head
    k, v = (torch.randn(B, K, S, D, device=dev, dtype=dtype, generator=g) for _ in "kv")
    mask = (torch.arange(S, device=dev) <= S // 2)[None, None, None]  # half the cache filled

    @torch.no_grad()
    def run():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return run, 4 * B * H * S * D


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    info = {"what": "device", "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if cuda else "cpu"}
    if cuda:
        info["cudnn"] = torch.backends.cudnn.version()
    print(json.dumps(info), flush=True)
    rows = []
    for name, shape in (SHAPES if cuda else TINY).items():
        B, H, K, T, S, D, train = shape
        for expand in (False, True) if train and H != K else (False,):  # GQA in place, and expanded
            run, flops = case(shape, dev, dtype, expand)
            for bname, backend in BACKENDS.items():
                label = f"{name}{', K/V expanded' if expand else ''}"
                try:
                    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                        s = timed(run, args.reps, cuda)
                    rec = {"what": "sdpa", "shape": label, "backend": bname, "ms": round(s * 1e3, 4),
                           "tflops": round(flops / s / 1e12, 1)}
                except Exception as e:  # a backend that cannot serve this call
                    rec = {"what": "sdpa", "shape": label, "backend": bname, "error": str(e).splitlines()[0][:160]}
                print(json.dumps(rec), flush=True)
                rows.append(rec)
    print(f"\n{'shape':44s}{'backend':16s}{'ms':>10s}{'TFLOP/s':>10s}")
    for r in rows:
        if "ms" in r:
            print(f"{r['shape']:44s}{r['backend']:16s}{r['ms']:10.3f}{r['tflops']:10.1f}")
        else:
            print(f"{r['shape']:44s}{r['backend']:16s}  {r['error']}")


if __name__ == "__main__":
    main()
