"""Batch-1 bf16 decode on a CUDA GPU with the compiled one-token step: tokens/s of lmforge (and of
transformers `generate()` with its static cache, compiled, on the same weights). SmolLM2-135M shape with
random weights (speed does not depend on the values), 32-token prompt, 256 new tokens, no early stop.

    python benchmarks/gpu_decode.py [--new-tokens 256] [--no-hf] [--profile 64] [--quantize int4 int8] [--products]

--quantize also decodes with lmforge.quantize's int8 / int4 modules (CUDA: int4 through torch's tinygemm kernel,
int8 widened in a compiled product) beside bf16, in the same call. --products times one row's product for each
linear shape of SmolLM2 and of a 7B LLaMA: bf16 F.linear, int8 and int4 modules (compiled), in GB/s of weights.

--profile N also traces N compiled steps with torch.profiler and prints, per token: the wall time, the time
the GPU spent in kernels, the number of kernels, and the kernels that take most of it (is the step bound by
the host, by kernel count, or by a few slow kernels?).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from lmforge.config import ModelConfig
from lmforge.generate import generate
from lmforge.model import Transformer


def profile_steps(model, prompt: list[int], n: int, dev: torch.device) -> None:
    """Traces one compiled generate() of n tokens (after a warm one) and prints where a token's time goes."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    generate(model, [prompt], max_new_tokens=n, compile=True, stop_ids=[-1])
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        generate(model, [prompt], max_new_tokens=n, compile=True, stop_ids=[-1])
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if getattr(e, "device_type", None) == DeviceType.CUDA:
            kernels.setdefault(e.name, []).append(e.time_range.elapsed_us())
    busy = sum(sum(v) for v in kernels.values())
    count = sum(len(v) for v in kernels.values())
    print(json.dumps({"what": "decode profile", "tokens": n, "wall_ms_per_token": round(wall / n * 1e3, 3),
                      "gpu_busy_ms_per_token": round(busy / n / 1e3, 3), "kernels_per_token": round(count / n, 1)}),
          flush=True)
    top = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:20]
    print(f"{'kernel (top 20 by time)':90s}{'per token':>10s}{'us each':>10s}{'share':>8s}")
    for name, ts in top:
        print(f"{name[:88]:90s}{len(ts) / n:10.1f}{sum(ts) / len(ts):10.2f}{sum(ts) / max(busy, 1e-9):8.1%}")
    if not cuda:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def products(dev: torch.device) -> None:
    """One row through each linear shape of SmolLM2-135M and of LLaMA-2-7B: microseconds and GB/s of weights
    read, for bf16 and lmforge's int8 / int4 modules, each in a compiled function (the decode step's form)."""
    from torch import nn

    from lmforge.quantize import quantize

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for n, k in ((960, 576), (3072, 576), (576, 1536), (49152, 576), (12288, 4096), (22016, 4096), (4096, 11008)):
        lin = nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        row = {"what": "product", "device": str(dev), "out": n, "in": k}
        for name in ("bf16", "int8", "int4"):
            layer = lin if name == "bf16" else quantize(nn.Sequential(copy.deepcopy(lin)), name)[0]
            tg = getattr(layer, "tinygemm_weight", None)  # int4 on CUDA reads tinygemm's copy, not the blocks
            read = [tg, layer.tinygemm_scale_zero] if tg is not None else list(layer.parameters())
            nbytes = sum(t.numel() * t.element_size() for t in read)
            fn = torch.compile(layer)
            for _ in range(3):
                fn(x)
            sync()
            reps = 200 if dev.type == "cuda" else 5
            t = time.perf_counter()
            for _ in range(reps):
                fn(x)
            sync()
            us = (time.perf_counter() - t) / reps * 1e6
            row[f"{name}_us"], row[f"{name}_GBs"] = round(us, 1), round(nbytes / us / 1e3, 1)
        print(json.dumps(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--profile", type=int, default=0, help="trace this many compiled steps (0: none)")
    p.add_argument("--quantize", nargs="*", default=[], choices=["int8", "int4"])
    p.add_argument("--products", action="store_true", help="time one row's product per linear shape")
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = ModelConfig.from_preset("smollm2-135m")
    torch.manual_seed(0)
    with torch.device(dev):
        model = Transformer(cfg).to(dtype).eval()
    prompt = torch.randint(0, cfg.vocab_size, (32,)).tolist()
    n = args.new_tokens
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def ours(compile_: bool) -> float:
        generate(model, [prompt], max_new_tokens=n, compile=compile_, stop_ids=[-1])  # warm-up / compile
        best = 0.0
        for _ in range(args.rounds if compile_ else 1):  # eager is informative only: one round
            sync()
            t = time.perf_counter()
            out = generate(model, [prompt], max_new_tokens=n, compile=compile_, stop_ids=[-1])
            sync()
            best = max(best, len(out[0]) / (time.perf_counter() - t))
        return best

    rows: dict[str, float] = {}

    def record(name: str, value: float) -> None:  # printed as soon as measured: a time limit loses nothing
        rows[name] = value
        print(json.dumps({"what": "decode", "name": name, "device": str(dev), "tok_s": round(value, 1)}), flush=True)

    record("lmforge eager", ours(False))
    record("lmforge compiled step", ours(True))
    if args.quantize:
        from lmforge.quantize import quantize

        bf16 = model
        for scheme in args.quantize:
            model = quantize(copy.deepcopy(bf16), scheme)
            record(f"lmforge compiled step {scheme}", ours(True))
        model = bf16
    if args.products:
        products(dev)
    if args.profile:
        profile_steps(model, prompt, args.profile, dev)
    if not args.no_hf:
        import transformers as tf

        from lmforge.checkpoint.hf import to_hf

        hf_cfg = tf.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                                num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                                rope_theta=cfg.rope_theta, tie_word_embeddings=True)
        ref = tf.LlamaForCausalLM(hf_cfg).to(dev, dtype).eval()
        ref.load_state_dict(to_hf(model.state_dict(), "llama", cfg), strict=False)
        ids = torch.tensor([prompt], device=dev)
        for name, kw in (("transformers generate", {}),
                         ("transformers static+compile", {"cache_implementation": "static"})):
            try:
                ref.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
                best = 0.0
                for _ in range(args.rounds):
                    sync()
                    t = time.perf_counter()
                    ref.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
                    sync()
                    best = max(best, n / (time.perf_counter() - t))
                record(name, best)
            except Exception as e:  # report and go on
                print(json.dumps({"what": "error", "name": name, "err": repr(e)[:300]}))
    print(f"\n{'':32s}{'tokens/s (best of ' + str(args.rounds) + ')':>24s}")
    for k, v in rows.items():
        print(f"{k:32s}{v:24,.1f}")


if __name__ == "__main__":
    main()
