"""Batch-1 bf16 decode on a CUDA GPU with the compiled one-token step: tokens/s of lmforge (and of
transformers `generate()` with its static cache, compiled, on the same weights). SmolLM2-135M shape with
random weights (speed does not depend on the values), 32-token prompt, 256 new tokens, no early stop.

    python benchmarks/gpu_decode.py [--new-tokens 256] [--no-hf] [--profile 64]

--profile N also traces N compiled steps with torch.profiler and prints, per token: the wall time, the time
the GPU spent in kernels, the number of kernels, and the kernels that take most of it (is the step bound by
the host, by kernel count, or by a few slow kernels?).
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--profile", type=int, default=0, help="trace this many compiled steps (0: none)")
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
