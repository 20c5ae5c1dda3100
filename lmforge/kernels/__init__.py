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
- `fused.cpp`, element-wise passes of an fp32 training step, each one pass over memory where torch's eager
  ops take several (any AVX2 CPU): SwiGLU forward/backward (`silu_mul`), RMSNorm forward/backward, RoPE, and
  the softmax cross-entropy of a block of logits that becomes its own gradient (`softmax_xent_`, one row at
  a time, in cache). `fused_on()` builds them; the model's hand-written autograd Functions call them.
- `blas_mm.cpp`, fp32 products through OpenBLAS (the scipy-openblas32 wheel), for CPUs that are not Intel's,
  where MKL (torch's choice) takes slower code paths: `mm` / `gemm_` (one single-threaded OpenBLAS call per
  block of the output on each of ATen's threads; OpenBLAS's own threads would spin on the cores ATen needs)
  and `causal_attention` with its backward (64 query rows at a time against the keys they may see).
  `matmul` picks it or torch's; `model.Linear`, the LM-head loss and training attention use it.
  LMFORGE_CPU_BLAS=openblas or =torch chooses on any CPU.

A training step of a 20M LLaMA (8 x 256 tokens) on a 2-core AMD EPYC, in one process: products 8%, the fused
passes ~150 ms, attention 1.4x faster; the step went from 1.12x to 1.35x transformers' (median of 24 pairs).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
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

    if _cpu_can_run() and _try_build("half_gemv"):
        for dt in dtypes:
            if _EMULATED_HALF.get(dt, False):
                HALF_GEMV[dt] = True
    return any(HALF_GEMV.values())


_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
# ATen's Vectorized<float> as 8-wide AVX2 (the code any AVX2 or AVX-512 CPU runs)
_VEC_AVX2 = ("-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2")
_EXTRA_CFLAGS = {"fused": _VEC_AVX2, "blas_mm": _VEC_AVX2}


def _library(name: str, ldflags: tuple[str, ...] = (), versions: str = "") -> tuple[str, list[str], Path]:
    """(extension name, C++ flags, path of the built library) of `name`.cpp: named by its source, flags and
    torch (and the libraries it links), so two checkouts or versions never rebuild one another's library."""
    from torch.utils.cpp_extension import _get_build_directory

    source = Path(__file__).with_name(f"{name}.cpp")
    cflags = [*_CFLAGS, *_EXTRA_CFLAGS.get(name, ())]
    key = hashlib.sha256(source.read_bytes() + " ".join([*cflags, *ldflags, torch.__version__, versions]).encode())
    ext = f"lmforge_{name}_{key.hexdigest()[:12]}"
    return ext, cflags, Path(_get_build_directory(ext, verbose=False)) / f"{ext}.so"


def _build(name: str, ldflags: tuple[str, ...] = (), versions: str = "") -> bool:
    """Builds (or finds built) and loads the library `name`.cpp; False if it was loaded already."""
    from torch.utils.cpp_extension import load

    if hasattr(torch.ops.lmforge, _FAKES[name][0][0]):
        return False
    ext, cflags, built = _library(name, ldflags, versions)
    if not built.exists() and name not in _building:  # (a prebuild process says so itself)
        print(f"lmforge: building the CPU kernel {name} (once, ~20 s; cached for later runs)", file=sys.stderr,
              flush=True)
    load(name=ext, sources=[str(Path(__file__).with_name(f"{name}.cpp"))], extra_cflags=cflags,
         extra_ldflags=["-fopenmp", *ldflags], is_python_module=False, verbose=False)
    return True


def _build_args(name: str) -> tuple[tuple[str, ...], str] | None:
    """(link flags, versions of what it links) of a library; None where it cannot be built (blas_mm without
    scipy-openblas32)."""
    if name != "blas_mm":
        return (), ""
    try:
        import scipy_openblas32
    except ImportError:
        return None
    lib = scipy_openblas32.get_lib_dir()
    return ((f"-L{lib}", f"-l{scipy_openblas32.get_library()}", f"-Wl,-rpath,{lib}"),
            f"scipy-openblas32 {scipy_openblas32.__version__}")


def prebuild(wait: bool = True) -> list[subprocess.Popen]:
    """Compiles the training kernels this CPU will use that are not built yet (`fused`, and `blas_mm` where
    OpenBLAS is chosen), each in its own process at the same time: on first use ~20 s in all, not ~20 s
    each. `fit` calls it before training on CPU; the quickstart starts it (wait=False) before its corpus and
    tokenizer. A failed build here is only reported when the kernel is loaded."""
    if not _cpu_can_run():
        return []
    procs = []
    for name in ["fused"] + (["blas_mm"] if _wants_blas() else []):
        args = _build_args(name)
        if name in _building:  # started by an earlier call
            procs.append(_building[name])
        elif name not in _tried and args is not None and not _library(name, *args)[2].exists():
            _building[name] = subprocess.Popen([sys.executable, "-m", "lmforge.kernels", name],
                                               stdout=subprocess.DEVNULL)
            procs.append(_building[name])
    for p in procs if wait else ():
        p.wait()
    return procs


_building: dict[str, subprocess.Popen] = {}  # kernel -> the process compiling it (prebuild)


def _try_build(name: str, *build_args: str | tuple[str, ...]) -> bool:
    """Builds and loads `name` once per process (then registers its ops' shapes for torch.compile); a
    failure warns once and returns False."""
    if name not in _tried:
        _tried[name] = False
        try:
            if _build(name, *build_args):
                for op, fake in _FAKES[name]:
                    torch.library.register_fake(f"lmforge::{op}")(fake)
            _tried[name] = True
        except Exception as e:  # no compiler, no headers, ...: the library kernel stays
            warnings.warn(f"lmforge: the CPU kernel {name} could not be built here ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}); using torch's kernel. "
                          "Set LMFORGE_CPU_KERNELS=0 to skip the attempt.", stacklevel=3)
    return _tried[name]


def _half_gemv_fake(weight: torch.Tensor, x: torch.Tensor, fp32_out: bool = False) -> torch.Tensor:
    return weight.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32 if fp32_out else weight.dtype)


def fused_on() -> bool:
    """Whether the fused element-wise training kernels (`fused.cpp`: SwiGLU forward and backward, softmax
    cross-entropy of a block of logits) are loaded; builds them on the first call on an AVX2 CPU."""
    if "fused" in _tried:  # decided (read on every training forward: no re-check)
        return _tried["fused"]
    return _cpu_can_run() and _try_build("fused")


# ---- fp32 matrix products through OpenBLAS ------------------------------------------------------------

# whether `matmul` uses lmforge::mm (None: not decided yet; decided on the first product it is asked for)
BLAS: dict[str, bool | None] = {"on": None}
_BLAS_MIN = 16  # fewer rows or columns than this: torch's call (nothing to gain, and a decode step's GEMVs)


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def load_blas_mm(force: bool = False) -> bool:
    """Decides (once) whether fp32 products go through OpenBLAS: on x86 Linux with AVX2, scipy-openblas32
    installed and a CPU that is not Intel's (MKL is Intel's own and fastest there); LMFORGE_CPU_BLAS=openblas
    or =torch (or `force`) decides instead. Builds the operator on first use. Returns whether it is on."""
    on = (force or _wants_blas()) and os.environ.get("LMFORGE_CPU_BLAS") != "torch"
    args = _build_args("blas_mm") if on else None
    BLAS["on"] = args is not None and _try_build("blas_mm", *args)
    return BLAS["on"]


def _wants_blas() -> bool:
    """LMFORGE_CPU_BLAS's choice; by default OpenBLAS on an x86 Linux CPU with AVX2 that is not Intel's."""
    choice = os.environ.get("LMFORGE_CPU_BLAS", "")
    if choice not in ("", "openblas", "torch"):
        raise ValueError(f"LMFORGE_CPU_BLAS={choice!r}: expected 'openblas' or 'torch'")
    return choice == "openblas" or (choice == "" and _cpu_can_run() and sys.platform == "linux"
                                    and _cpu_vendor() not in ("", "GenuineIntel"))


def blas_on() -> bool:
    """Whether fp32 products go through OpenBLAS here (decided, and built, on the first call)."""
    if BLAS["on"] is None:
        load_blas_mm()
    return bool(BLAS["on"])


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, beta: float = 0.0) -> torch.Tensor:
    """a @ b for 2-D tensors, into `out` (times beta, plus) when given: lmforge::gemm_ for fp32 CPU products
    of at least 16 rows and columns where `load_blas_mm` turned it on, torch's otherwise."""
    if (blas_on() and a.dtype == b.dtype == torch.float32 and a.device.type == "cpu" and b.device.type == "cpu"
            and min(a.shape[0], b.shape[1]) >= _BLAS_MIN and (out is None or out.stride(-1) == 1)):
        if out is None:
            return torch.ops.lmforge.mm(a, b)
        torch.ops.lmforge.gemm_(out, a, b, beta)
        return out
    if out is None:
        return a @ b
    return out.addmm_(a, b, beta=beta) if beta else torch.mm(a, b, out=out)


def _attention_fake(q, k, v, scale):
    B, H, T, D = q.shape
    return q.new_empty((B, T, H, D)).permute(0, 2, 1, 3), q.new_empty((B, H, T))


def _attention_backward_fake(grad, q, k, v, out, lse, scale):
    return tuple(t.new_empty((t.shape[0], t.shape[2], t.shape[1], t.shape[3])).permute(0, 2, 1, 3) for t in (q, k, v))


# each library's ops and their shape functions (for torch.compile), registered once it is loaded
_FAKES = {
    "half_gemv": [("half_gemv", _half_gemv_fake)],
    "fused": [("silu_mul", lambda gate, up: gate.new_empty(gate.shape)),
              ("silu_mul_backward_", lambda d, grad, gate, up: None),
              ("softmax_xent_", lambda z, labels, ignore_index: z.new_empty(z.shape[:1])),
              ("rope", lambda x, C, S, interleaved: x.new_empty(x.shape)),
              ("rms_norm", lambda x, w, eps: (x.new_empty(x.shape), x.new_empty(x.shape[:1]))),
              ("rms_norm_backward", lambda g, x, w, rstd: (x.new_empty(x.shape), w.new_empty(w.shape)))],
    "blas_mm": [("mm", lambda a, b: a.new_empty((a.shape[0], b.shape[1]))),
                ("gemm_", lambda c, a, b, beta: None),
                ("causal_attention", _attention_fake),
                ("causal_attention_backward", _attention_backward_fake)],
}
