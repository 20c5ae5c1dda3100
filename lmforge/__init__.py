"""lmforge: one small, fast, hackable PyTorch codebase for the whole life of a decoder-only LM.

The public names load on first use (`lmforge.load`, `from lmforge import Transformer`), so importing one
module, e.g. `lmforge.model`, imports only what that module needs."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_HOMES = {
    "ModelConfig": "lmforge.config", "Transformer": "lmforge.model", "Tokenizer": "lmforge.tokenizer",
    "load": "lmforge.checkpoint", "save": "lmforge.checkpoint", "CheckpointError": "lmforge.checkpoint",
    "generate": "lmforge.generate",
}
__all__ = [*_HOMES, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
