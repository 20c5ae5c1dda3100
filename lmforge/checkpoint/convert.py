"""`lmforge convert`: any checkpoint lmforge reads, written as a Hugging Face folder or as a GGUF file.

What a destination may be is decided before the (slow) load: a folder replaces only a model folder (never a
file, never a non-empty folder without config.json); a name ending .gguf is a GGUF file of an `outtype`, a
folder takes a `dtype`, and each option is refused for the other kind."""

from __future__ import annotations

import os
from pathlib import Path

from lmforge.checkpoint.native import load, save
from lmforge.model import Transformer


def gguf_outtype(dst: str | os.PathLike, dtype: str | None = None, outtype: str | None = None) -> str | None:
    """The GGUF tensor type to write for a .gguf destination (f16 unless `outtype`), None for a folder; raises
    ValueError for options that do not apply and for a destination converting would destroy."""
    from lmforge.checkpoint.gguf import OUTTYPES

    to_gguf = str(dst).lower().endswith(".gguf")
    if outtype is not None and not to_gguf:
        raise ValueError(f"--outtype {outtype} is for a .gguf destination; {dst} is a folder (use --dtype)")
    if to_gguf and dtype is not None:
        raise ValueError("--dtype is for a folder destination; a .gguf one takes --outtype (f32, f16, bf16, q8_0, q4_0, q4_1)")
    folder = Path(dst)
    if folder.is_file() and not to_gguf:
        raise ValueError(f"{folder}: exists and is a file; the destination is a new or a model folder")
    if folder.is_dir() and not to_gguf and any(folder.iterdir()) and not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: exists and is not a model folder (no config.json); converting there would "
                         "replace what it holds: choose a new destination")
    if not to_gguf:
        return None
    outtype = outtype or "f16"
    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    return outtype


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None,
            outtype: str | None = None) -> Transformer:
    """Reads `src` (HF folder, lmforge folder or .gguf file) on CPU and writes it to `dst`: a GGUF file of
    `outtype` when the name ends .gguf, else a model folder with weights in `dtype` (default: as stored).
    Returns the model."""
    gguf_type = gguf_outtype(dst, dtype, outtype)  # before the load: a refused destination costs nothing
    model, tokenizer = load(src, device="cpu", dtype=None if gguf_type else dtype)
    if gguf_type is None:
        save(model, tokenizer, dst)
        return model
    from lmforge.checkpoint.gguf import write_gguf

    if tokenizer is None:
        raise ValueError(f"{src}: no tokenizer.json; a GGUF file holds the tokenizer too")
    write_gguf(model, tokenizer, dst, gguf_type)
    return model
