"""lmforge and llama.cpp read the same GGUF file to the same model: on SmolLM2's own Q4_1 / Q8_0 blocks
(lmforge's integer kernels included) both give the perplexity of the fp32 product under llama.cpp's convention. llama.cpp is a
benchmark anchor, never a dependency: these tests run only where its binaries are (LMFORGE_LLAMA_CPP, a folder with
llama-perplexity, default ~/.cache/llama.cpp-bin as ../shared/bench/build_llama_cpp.sh builds it)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.smollm2 import SMOLLM2, needs_smollm2

TOOLS = Path(os.environ.get("LMFORGE_LLAMA_CPP", "~/.cache/llama.cpp-bin")).expanduser()
MANUAL = Path(__file__).parents[1] / "examples" / "product_manual" / "manual"
needs_llama_cpp = pytest.mark.skipif(not (TOOLS / "llama-perplexity").is_file(),
                                     reason=f"no llama.cpp build at {TOOLS} (set LMFORGE_LLAMA_CPP)")


def llama_perplexity(model: Path, text: Path, ctx: int) -> float:
    out = subprocess.run([str(TOOLS / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", str(ctx), "-t",
                          "2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr).group(1))


@pytest.mark.slow  # two SmolLM2 files through both tools: ~1-2 min on 2 cores
@needs_llama_cpp
@needs_smollm2
@pytest.mark.parametrize("outtype", ["q4_1", "q8_0"])
def test_perplexity_on_the_files_own_blocks_is_llama_cpps(tmp_path, outtype):
    import lmforge
    from lmforge.checkpoint.gguf import write_gguf
    from lmforge.evaluate import perplexity
    from lmforge.quantize import Int4Linear, Int8Linear, load_gguf_blocks

    text = tmp_path / "manual.txt"
    text.write_text("".join(p.read_text() for p in sorted(MANUAL.glob("*.md"))))
    path = SMOLLM2
    if outtype != "q4_1":  # written by lmforge from the shipped file: llama.cpp reads lmforge's export too
        path = write_gguf(*lmforge.load(SMOLLM2, device="cpu"), tmp_path / f"smollm2.{outtype}.gguf", outtype)
    model, tok = lmforge.load(path, device="cpu")  # the blocks dequantized: an fp32 model
    ctx = 64  # 63 rows a window: lmforge's GEMV kernels, 8 rows a call
    ppl = lambda m: perplexity(m, tok, [text.read_text()], seq_len=ctx, score_from=ctx // 2, progress=False)["ppl"]  # noqa: E731
    exact = ppl(model)
    load_gguf_blocks(model, path)
    assert sum(isinstance(m, (Int4Linear, Int8Linear)) for m in model.modules()) == 4 * 30 + 1
    ours, theirs = ppl(model), llama_perplexity(path, text, ctx)
    assert abs(ours - exact) < 1e-3 * exact, (ours, exact)  # lmforge's int16 activations: as the fp32 product
    # llama.cpp reads the activations in 8 bits: measured 0.04% (Q4_1) and 0.8% (Q8_0) off the fp32 product
    assert abs(theirs - exact) < 0.015 * exact, (theirs, exact)
