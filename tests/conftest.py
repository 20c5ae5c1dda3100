"""Fixtures shared across the suite: one trained tiny tokenizer and one saved tiny model folder per session
(each test module used to train and save its own)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.tiny import CORPUS, make_tiny


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE of 300 tokens trained on CORPUS (ChatML template, eos)."""
    from lmforge.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS * 3, 300)


@pytest.fixture(scope="session")
def tiny_folder(tiny_tokenizer, tmp_path_factory) -> Path:
    """A tiny random llama-family model (context 64) with `tiny_tokenizer`, saved as a model folder. Tests
    that change what is in it copy it first."""
    import lmforge

    model = make_tiny(tiny_tokenizer.vocab_size, max_seq_len=64, init_std=0.2)
    return lmforge.save(model, tiny_tokenizer, tmp_path_factory.mktemp("tiny") / "model")
