"""lmforge: one small, fast, hackable PyTorch codebase for the whole life of a decoder-only LM."""

from lmforge.checkpoint import CheckpointError, load, save
from lmforge.config import ModelConfig
from lmforge.model import Transformer

__version__ = "0.1.0"
__all__ = ["ModelConfig", "Transformer", "load", "save", "CheckpointError", "__version__"]


def __getattr__(name: str):  # heavier pieces load on first use
    if name == "Tokenizer":
        from lmforge.tokenizer import Tokenizer

        return Tokenizer
    if name == "generate":
        from lmforge.generate import generate

        return generate
    raise AttributeError(name)
