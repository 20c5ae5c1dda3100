"""Hand-written CPU kernels, for what the libraries torch calls do poorly on common CPUs. Each is C++ built
once on first use by torch's extension builder (the same C++ compiler torch.compile needs on CPU; the build
is cached under ~/.cache/torch_extensions, ~20 s the first time; a build killed half-way can leave torch's
lock file there, which then makes the next build wait: delete that folder), registered as a torch operator (so a
compiled graph calls it like any other), and optional: where it cannot be built, or with
LMFORGE_CPU_KERNELS=0, the model keeps the library call.

- `lmforge::half_gemv(weight, x, fp32_out=False)`: one to eight bf16/fp16 rows x (K,) or (M, K) times a
  weight matrix (decoding; each weight row read once for all M) on an x86 CPU with AVX2 but without bf16/fp16
  instructions. On the LM head of SmolLM2 on a 2-core EPYC, in one process: 18.8 vs 13.8 GB/s of weights for
  oneDNN's kernel at one row; 3x its speed at eight rows.
"""

from __future__ import annotations

import hashlib
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


_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]


def _build(name: str) -> None:
    from torch.utils.cpp_extension import _get_build_directory, load

    if not hasattr(torch.ops.lmforge, name):
        source = Path(__file__).with_name(f"{name}.cpp")
        # named by its source, flags and torch: two checkouts or versions never rebuild one another's library
        key = hashlib.sha256(source.read_bytes() + " ".join(_CFLAGS).encode() + torch.__version__.encode())
        ext = f"lmforge_{name}_{key.hexdigest()[:12]}"
        if not (Path(_get_build_directory(ext, verbose=False)) / f"{ext}.so").exists():
            print(f"lmforge: building the CPU kernel {name} (once, ~20 s; cached for later runs)", file=sys.stderr,
                  flush=True)
        load(name=ext, sources=[str(source)], extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)

        @torch.library.register_fake(f"lmforge::{name}")
        def _(weight: torch.Tensor, x: torch.Tensor, fp32_out: bool = False) -> torch.Tensor:  # for torch.compile
            return weight.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32 if fp32_out else weight.dtype)
