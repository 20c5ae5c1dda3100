"""`lmforge prepare` throughput vs the naive loop (one process, `backend.encode(doc)` per document).

Writes a synthetic corpus (.jsonl and .txt files) to a temporary folder, trains a byte-level BPE on a slice
of it, then times both ways end to end (reading documents included) and prints tokens/s and the ratio.

    python benchmarks/prepare_throughput.py --mb 64 --files 8 --repeat 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from lmforge.data.documents import iter_documents, resolve_sources
from lmforge.data.prepare import prepare
from lmforge.tokenizer import train_tokenizer


def make_corpus(folder: Path, mb: int, n_files: int, seed: int = 0) -> list[Path]:
    """Zipf-distributed made-up words, numbers, punctuation and some non-ASCII; documents of 20-2000 words."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(1, 10))) for _ in range(20000)]
    vocab += ["café", "naïve", "東京", "数据", "😀", "Ωμέγα", "ß", "—"]
    cum = list(itertools.accumulate(1 / (i + 1) for i in range(len(vocab))))
    per_file = mb * 2**20 // n_files
    files = []
    for i in range(n_files):
        path = folder / (f"part{i}.jsonl" if i % 2 == 0 else f"part{i}.txt")
        size = 0
        with open(path, "w", encoding="utf-8") as f:
            while size < per_file:
                words = rng.choices(vocab, cum_weights=cum, k=rng.randint(20, 2000))
                for j in range(0, len(words), 17):
                    tail = rng.choice([".", ",", "", "", f" {rng.randint(0, 9999)}"])
                    words[j] = words[j].capitalize() + tail
                doc = " ".join(words)
                if path.suffix == ".jsonl":
                    line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
                else:
                    line = doc + "\n\n"
                f.write(line)
                size += len(line.encode())
        files.append(path)
    return files


def naive(files: list[Path], backend) -> int:
    """One process, one `encode` call per document (the loop people write first)."""
    n = 0
    for f in files:
        for doc, _ in iter_documents(f):
            ids = backend.encode(doc, add_special_tokens=False).ids
            ids.append(0)
            n += len(np.array(ids, dtype=np.uint16))
    return n


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the prepare workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=64, help="corpus size in MiB")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--workers", type=int, default=None, help="default: one per CPU")
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs of each; the best is reported")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="lmforge-bench-"))
    try:
        t = time.perf_counter()
        (tmp / "corpus").mkdir()
        files = make_corpus(tmp / "corpus", args.mb, args.files)
        print(f"corpus: {args.mb} MiB in {args.files} files ({time.perf_counter() - t:.1f}s to write)")
        t = time.perf_counter()
        sample = [doc for doc, _ in iter_documents(files[0])][:2000]
        tok = train_tokenizer(sample, args.vocab)
        t = time.perf_counter() - t
        print(f"tokenizer: vocab {tok.vocab_size} trained on {len(sample)} docs ({t:.1f}s)")

        runs: dict[str, list[tuple[float, float]]] = {"naive": [], "prepare": []}
        n_naive = n_prep = 0
        for r in range(args.repeat):  # alternate the two, keep each one's best run (others share this machine)
            c, t = cpu_seconds(), time.perf_counter()
            n_naive = naive(resolve_sources(files), tok.backend)
            runs["naive"].append((time.perf_counter() - t, cpu_seconds() - c))
            c, t = cpu_seconds(), time.perf_counter()
            n_prep = prepare(files, tok, tmp / f"out{r}", workers=args.workers, progress=False).total_tokens
            runs["prepare"].append((time.perf_counter() - t, cpu_seconds() - c))
            print(f"run {r}: naive {runs['naive'][-1][0]:.2f}s, prepare {runs['prepare'][-1][0]:.2f}s, "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)
        assert n_prep == n_naive, (n_prep, n_naive)
        (t_naive, c_naive), (t_prep, c_prep) = min(runs["naive"]), min(runs["prepare"])

        workers = args.workers or len(os.sched_getaffinity(0))
        print(f"\nbest of {args.repeat}: {n_naive:,} tokens, {os.cpu_count()} CPUs")
        print(f"{'method':<44}{'wall s':>8}{'tokens/s':>12}{'CPU s':>8}{'tokens/CPU s':>14}")
        for name, t, c in [("naive: 1 process, encode() per document", t_naive, c_naive),
                           (f"prepare: {workers} workers, batch encode, shards", t_prep, c_prep)]:
            print(f"{name:<44}{t:>8.2f}{n_naive / t:>12,.0f}{c:>8.2f}{n_naive / c:>14,.0f}")
        print(f"\nratio (wall): {t_naive / t_prep:.2f}x   ratio (tokens/CPU s): {c_naive / c_prep:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
