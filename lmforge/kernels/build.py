"""Building, caching and loading the C++ CPU kernels. Each `NAME.cpp` is compiled once per machine by
torch's extension builder (the C++ compiler torch.compile needs on CPU; ~20 s the first time), cached under
~/.cache/torch_extensions, and registered as `torch.ops.lmforge.*` operators, so a compiled graph calls
them like any other op. A build killed half-way can leave torch's lock file there, which then makes the next
build wait: delete that folder. Nothing here builds inside a forward: `accelerate` loads what a model will
use before it swaps modules, and `prebuild` compiles several kernels at once."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

ENV_KERNELS = "LMFORGE_CPU_KERNELS"  # =0: never build or use lmforge's C++ kernels (torch's ops everywhere)

_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
# ATen's Vectorized<float> as 8-wide AVX2 (the code any AVX2 or AVX-512 CPU runs)
_VEC_AVX2 = ("-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2")
_EXTRA_CFLAGS = {"fused": _VEC_AVX2, "blas_mm": _VEC_AVX2, "decode_attention": _VEC_AVX2, "decode_step": _VEC_AVX2}
# the quantized GEMVs' integer dot products: AVX512-VNNI's multiply-and-add where the CPU has it (qx.h), else AVX2's
_VNNI = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni")
# bf16 weights' products: AVX512-BF16's dot product where the CPU has it (half_gemv.h), else AVX2's
_BF16 = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16")


@functools.cache
def cpuinfo(field: str) -> str:
    """The first `field` line's value in /proc/cpuinfo ("vendor_id", "flags"); empty where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(field)), "")
    except OSError:
        return ""


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU."""
    return frozenset(cpuinfo("flags").split())


def _extra_cflags(name: str) -> tuple[str, ...]:
    flags = cpu_flags()
    extra = _VNNI if name in ("int8_gemv", "int4_gemv", "decode_step") and {"avx512_vnni", "avx512vl", "avx512bw"} <= flags else ()
    if name in ("half_gemv", "decode_step") and {"avx512_bf16", "avx512vl", "avx512bw"} <= flags:
        extra += tuple(f for f in _BF16 if f not in extra)
    return extra + _EXTRA_CFLAGS.get(name, ())


def _not_cuda_home_notice(record: logging.LogRecord) -> bool:
    """Drops torch's 'No CUDA runtime is found, using CUDA_HOME=...' (a CUDA build of torch on a machine
    without a GPU says it when torch.utils.cpp_extension is imported): these builds are CPU-only."""
    return not record.getMessage().startswith("No CUDA runtime is found")


# before anything imports torch.utils.cpp_extension, which logs it at import; only that one message is dropped
logging.getLogger("torch.utils.cpp_extension").addFilter(_not_cuda_home_notice)

_loaded: dict[str, bool] = {}  # kernel -> whether it loaded into this process (tried once per process)
_building: dict[str, subprocess.Popen] = {}  # kernel -> the process compiling it (prebuild)


def kernels_allowed(cpu_kernels: bool | None = None) -> bool:
    """Whether lmforge's C++ kernels may run here: an x86 CPU with AVX2 (or AVX-512), unless turned off by
    the argument or, when it is None, by LMFORGE_CPU_KERNELS=0."""
    if cpu_kernels is None:
        cpu_kernels = os.environ.get(ENV_KERNELS, "1") != "0"
    return cpu_kernels and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _library(name: str, ldflags: tuple[str, ...] = (), versions: str = "") -> tuple[str, list[str], Path]:
    """(extension name, C++ flags, path of the built library) of `name`.cpp: named by its source, flags and
    torch (and the libraries it links), so two checkouts or versions never rebuild one another's library."""
    from torch.utils.cpp_extension import _get_build_directory

    source = Path(__file__).with_name(f"{name}.cpp")
    cflags = [*_CFLAGS, *_extra_cflags(name)]
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # what the sources include
    key = hashlib.sha256(source.read_bytes() + headers + " ".join([*cflags, *ldflags, torch.__version__,
                                                                   versions]).encode())
    ext = f"lmforge_{name}_{key.hexdigest()[:12]}"
    return ext, cflags, Path(_get_build_directory(ext, verbose=False)) / f"{ext}.so"


def build_args(name: str) -> tuple[tuple[str, ...], str] | None:
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


def _registered(name: str) -> bool:
    """Whether library `name`'s ops (or its class) are registered in this process already."""
    if name in _CLASSES:
        try:
            return getattr(torch.classes.lmforge, _CLASSES[name]) is not None
        except (AttributeError, RuntimeError):
            return False
    return hasattr(torch.ops.lmforge, _FAKES[name][0][0])


def build(name: str, ldflags: tuple[str, ...] = (), versions: str = "") -> bool:
    """Builds (or finds built) and loads the library `name`.cpp; False if it was loaded already."""
    from torch.utils.cpp_extension import load as load_extension

    if _registered(name):
        return False
    ext, cflags, built = _library(name, ldflags, versions)
    if not built.exists() and name not in _building:  # (a prebuild process says so itself)
        print(f"lmforge: building the CPU kernel {name} (once, ~20 s; cached for later runs)", file=sys.stderr,
              flush=True)
    load_extension(name=ext, sources=[str(Path(__file__).with_name(f"{name}.cpp"))], extra_cflags=cflags,
                   extra_ldflags=["-fopenmp", *ldflags], is_python_module=False, verbose=False)
    return True


def load(name: str) -> bool:
    """Builds if needed and loads kernel `name` once per process (then registers its ops' shapes for
    torch.compile); True when its ops are there. A failure warns once and returns False: torch's ops stay."""
    if name not in _loaded:
        _loaded[name] = False
        args = build_args(name)
        if args is None:
            return False
        if name in _building:  # prebuild's process is compiling it: wait instead of compiling it twice
            _building[name].wait()
        try:
            if build(name, *args):
                for op, fake in _FAKES[name]:
                    torch.library.register_fake(f"lmforge::{op}")(fake)
            _loaded[name] = True
        except Exception as e:  # no compiler, no headers, ...: the library kernel stays
            warnings.warn(f"lmforge: the CPU kernel {name} could not be built here ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}); using torch's kernel. "
                          f"Set {ENV_KERNELS}=0 to skip the attempt.", stacklevel=3)
    return _loaded[name]


def loaded(name: str) -> bool:
    """Whether kernel `name` is loaded in this process (never builds)."""
    return _loaded.get(name, False)


def prebuild(names: list[str], wait: bool = True) -> list[subprocess.Popen]:
    """Compiles those of `names` not built yet, each in its own process at the same time: on first use ~20 s
    in all, not ~20 s each. A failed build here is only reported by `load`."""
    procs = []
    for name in names:
        args = build_args(name)
        if name in _building:  # started by an earlier call
            procs.append(_building[name])
        elif name not in _loaded and args is not None and not _library(name, *args)[2].exists():
            _building[name] = subprocess.Popen([sys.executable, "-m", "lmforge.kernels", name],
                                               stdout=subprocess.DEVNULL)
            procs.append(_building[name])
    for p in procs if wait else ():
        p.wait()
    return procs


def _half_gemv_fake(weight: torch.Tensor, x: torch.Tensor, fp32_out: bool = False) -> torch.Tensor:
    return weight.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32 if fp32_out else weight.dtype)


def _attention_fake(q, k, v, scale):
    B, H, T, D = q.shape
    return q.new_empty((B, T, H, D)).permute(0, 2, 1, 3), q.new_empty((B, H, T))


def _attention_backward_fake(grad, q, k, v, out, lse, scale):
    return tuple(t.new_empty((t.shape[0], t.shape[2], t.shape[1], t.shape[3])).permute(0, 2, 1, 3) for t in (q, k, v))


_CLASSES = {"decode_step": "DecodeStep"}  # libraries that register a class (torch.classes.lmforge.*), no op

# each library's ops and their shape functions (for torch.compile), registered once it is loaded
_FAKES = {
    "half_gemv": [("half_gemv", _half_gemv_fake)],
    "int8_gemv": [("int8_gemv", lambda q, scales, x, fp32_out=False: x.new_empty(
        (x.shape[0], q.shape[0]), dtype=torch.float32 if fp32_out else x.dtype))],
    "int4_gemv": [("int4_gemv", lambda packed, scale, minimum, x, fp32_out=False: x.new_empty(
        (x.shape[0], packed.shape[0]), dtype=torch.float32 if fp32_out else x.dtype))],
    "decode_attention": [("decode_attention", lambda q, k, v, mask, scale: q.new_empty(q.shape))],
    "decode_step": [],
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
