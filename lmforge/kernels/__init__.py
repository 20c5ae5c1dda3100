"""Hand-written CPU kernels, for what the libraries torch calls do poorly on common CPUs. Each is C++ built
once on first use by torch's extension builder (the same C++ compiler torch.compile needs on CPU; the build
is cached under ~/.cache/torch_extensions, ~20 s the first time), registered as a torch operator (so a
compiled graph calls it like any other), and optional: where it cannot be built, or with
LMFORGE_CPU_KERNELS=0, the model keeps the library call.

- `lmforge::half_gemv(weight, x, fp32_out=False)`: one bf16/fp16 row times a weight matrix (decoding at batch 1) on an x86
  CPU with AVX2 but without bf16/fp16 instructions: 1.6x oneDNN's kernel on the LM head of SmolLM2 measured
  on a 2-core EPYC (15.6 vs 9.3 GB/s of weights), 2-4x on the cache-sized layer matrices.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

# dtype -> use lmforge::half_gemv for one-row products (filled by `load_half_gemv`; read by model.Linear)
HALF_GEMV: dict[torch.dtype, bool] = {}
_tried: dict[str, bool] = {}


def _cpu_can_run() -> bool:
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512", "DEFAULT", "ZVECTOR", ...
    return capability in ("AVX2", "AVX512") and os.environ.get("LMFORGE_CPU_KERNELS", "1") != "0"


def load_half_gemv(dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)) -> bool:
    """Builds (once per machine) and loads `lmforge::half_gemv`, then turns it on for those of `dtypes`
    whose products this CPU emulates. Returns whether it is on for any; a failed build warns once and
    leaves the library kernels in place."""
    from lmforge.model import _EMULATED_HALF

    if "half_gemv" not in _tried:
        _tried["half_gemv"] = False
        if _cpu_can_run():
            try:
                _build("half_gemv")
                _tried["half_gemv"] = True
            except Exception as e:  # no compiler, no headers, ...: the library kernel stays
                warnings.warn(f"lmforge: the CPU kernel half_gemv could not be built here ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}); using torch's kernel. "
                              "Set LMFORGE_CPU_KERNELS=0 to skip the attempt.", stacklevel=2)
    if _tried["half_gemv"]:
        for dt in dtypes:
            if _EMULATED_HALF.get(dt, False):
                HALF_GEMV[dt] = True
    return any(HALF_GEMV.values())


def _build(name: str) -> None:
    from torch.utils.cpp_extension import load

    if not hasattr(torch.ops.lmforge, name):
        print(f"lmforge: loading the CPU kernel {name} (built once, ~20 s, then cached)", file=sys.stderr, flush=True)
        load(name=f"lmforge_{name}", sources=[str(Path(__file__).with_name(f"{name}.cpp"))],
             extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"], extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)

        @torch.library.register_fake(f"lmforge::{name}")
        def _(weight: torch.Tensor, x: torch.Tensor, fp32_out: bool = False) -> torch.Tensor:  # for torch.compile
            return weight.new_empty(weight.shape[0], dtype=torch.float32 if fp32_out else weight.dtype)
