"""What this CPU does well, decided once: which half-precision products it emulates, whether fp32 products go
through OpenBLAS, and the `Plan` that the swapped-in modules read (so a forward only looks up booleans)."""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys
from dataclasses import dataclass

import torch

from lmforge.kernels import build

ENV_BLAS = "LMFORGE_CPU_BLAS"  # =openblas or =torch: which library makes fp32 CPU products (default: by CPU)
BLAS_MIN = 16  # fewer rows or columns than this: torch's product (nothing to gain, and a decode step's GEMVs)


def _cpu_has(name: str) -> bool:
    """torch.cpu's test for an instruction set (e.g. "_is_avx512_bf16_supported"); False where torch lacks it."""
    return bool(getattr(torch.cpu, name, lambda: False)())


@functools.cache
def emulated_half() -> dict[torch.dtype, bool]:
    """Which half-precision matmuls this CPU lacks instructions for (bf16: AVX512-BF16 or AMX; fp16:
    AMX-FP16), so that oneDNN converts every element of both operands for every product: there, converting the
    weight once and multiplying in fp32 is faster for many rows (benchmarks/decode.py; README). Same result: a
    product of two bf16 (fp16) numbers is exact in fp32, and both sum in fp32."""
    return {torch.bfloat16: not (_cpu_has("_is_avx512_bf16_supported") or _cpu_has("_is_amx_tile_supported")),
            torch.float16: not _cpu_has("_is_amx_fp16_supported")}


def gemv_dtypes() -> frozenset[torch.dtype]:
    """The half dtypes whose decoding rows (1 to 8) go through lmforge's half_gemv: each one this CPU emulates,
    and bf16 where AVX512-BF16 is its bf16 instruction set (no AMX): there oneDNN's native one-row bf16 product
    ran at half the kernel's speed (SmolLM2, compiled decode, 2-core EPYC: 38-47 against 86-92 tok/s, the
    kernel at ~75% of the copy-bandwidth limit). CPUs with AMX keep oneDNN's (not measured)."""
    emulated = emulated_half()
    native_bf16 = _cpu_has("_is_avx512_bf16_supported") and not _cpu_has("_is_amx_tile_supported")
    return frozenset(dt for dt in HALF if emulated[dt] or (dt == torch.bfloat16 and native_bf16))


def cpu_vendor() -> str:
    return build.cpuinfo("vendor_id")


def wants_blas(blas: str | None = None, cpu_kernels: bool | None = None) -> bool:
    """Whether fp32 products should go through OpenBLAS: `blas` ('openblas', 'torch', or None: LMFORGE_CPU_BLAS,
    or when that is unset too, an x86 Linux CPU with AVX2 that is not Intel's: MKL, torch's choice, is Intel's
    own and fastest there and takes slower paths elsewhere)."""
    choice = os.environ.get(ENV_BLAS, "") if blas is None else blas
    if choice not in ("", "openblas", "torch"):
        raise ValueError(f"{ENV_BLAS if blas is None else 'blas'}={choice!r}: expected 'openblas' or 'torch'")
    if not build.kernels_allowed(cpu_kernels):
        return False
    return choice == "openblas" or (choice == "" and sys.platform == "linux"
                                    and cpu_vendor() not in ("", "GenuineIntel"))


def training_kernels(cpu_kernels: bool | None = None, blas: str | None = None) -> list[str]:
    """The kernels fp32 training uses here: the fused element-wise ones, and OpenBLAS where chosen."""
    if not build.kernels_allowed(cpu_kernels):
        return []
    return ["fused"] + (["blas_mm"] if wants_blas(blas, cpu_kernels) else [])


def prebuild(wait: bool = True) -> list:
    """Compiles the training kernels not built yet, in parallel processes (`build.prebuild`); the quickstart
    starts it (wait=False) before its corpus and tokenizer."""
    return build.prebuild(training_kernels(), wait)


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, beta: float = 0.0, *,
           blas: bool = False) -> torch.Tensor:
    """a @ b for 2-D tensors, into `out` (times beta, plus) when given: with `blas` (OpenBLAS loaded), through
    lmforge::gemm_ for fp32 CPU products of at least 16 rows and columns; torch's otherwise."""
    if (blas and a.dtype == b.dtype == torch.float32 and a.device.type == "cpu" and b.device.type == "cpu"
            and min(a.shape[0], b.shape[1]) >= BLAS_MIN and (out is None or out.stride(-1) == 1)):
        if out is None:
            return torch.ops.lmforge.mm(a, b)
        torch.ops.lmforge.gemm_(out, a, b, beta)
        return out
    if out is None:
        return a @ b
    return out.addmm_(a, b, beta=beta) if beta else torch.mm(a, b, out=out)


@dataclass(frozen=True)
class Plan:
    """Which fast paths the swapped-in modules take; decided by `accelerate` with the kernels already loaded.

    fused: `fused.cpp` (fp32 RMSNorm, SwiGLU, RoPE and the loss's softmax in one pass each; training).
    blas: `blas_mm.cpp` (fp32 products and causal training attention through OpenBLAS).
    half_gemv: dtypes whose one to eight row products use `half_gemv.cpp` (decoding).
    upcast: dtypes this CPU emulates: their many-row inference products run in fp32 (a prompt's prefill).
    decode_attention: one new token's attention to the KV cache through `decode_attention.cpp` (inference).
    """

    fused: bool = False
    blas: bool = False
    half_gemv: frozenset[torch.dtype] = frozenset()
    upcast: frozenset[torch.dtype] = frozenset()
    decode_attention: bool = False


_PLANS: dict[Plan, Plan] = {}  # one object per distinct plan: compiled graphs see the same one each call

HALF = (torch.bfloat16, torch.float16)


def make_plan(device: torch.device, dtype: torch.dtype, training: bool, cpu_kernels: bool | None = None,
              blas: str | None = None) -> Plan:
    """The plan for a model on `device` in `dtype`. Loads (building on first use) the kernels this use needs:
    for training the fused kernels and OpenBLAS where chosen, compiled in parallel; for inference OpenBLAS
    (fp32 prompts), the half-precision GEMV (emulated bf16/fp16) and the decoding attention. A kernel another use
    loaded is used too (harmless: each applies only where it fits), so a generation inside training never turns
    training's off."""
    if device.type != "cpu":
        return _PLANS.setdefault(Plan(), Plan())
    allowed = build.kernels_allowed(cpu_kernels)
    want_blas = dtype == torch.float32 and wants_blas(blas, cpu_kernels)
    emulated, gemv = emulated_half(), gemv_dtypes()
    want_gemv = allowed and not training and dtype in gemv
    if allowed and training and dtype == torch.float32:
        build.prebuild(training_kernels(cpu_kernels, blas))
        build.load("fused")
    if want_blas:
        build.load("blas_mm")
    if want_gemv:
        build.load("half_gemv")
    if allowed and not training:
        build.load("decode_attention")
    plan = Plan(fused=allowed and build.loaded("fused"),
                blas=wants_blas(blas, cpu_kernels) and build.loaded("blas_mm"),
                half_gemv=frozenset(dt for dt in gemv if allowed and build.loaded("half_gemv")),
                upcast=frozenset(dt for dt in HALF if emulated[dt]),
                decode_attention=allowed and build.loaded("decode_attention"))
    return _PLANS.setdefault(plan, plan)


HUGE_PAGE = 2 << 20


def on_huge_pages(tensors: list[torch.Tensor]) -> bool:
    """Moves `tensors` (CPU Parameters or buffers; their `.data`, so modules keep the same objects) into one
    buffer backed by 2 MiB pages, where Linux gives them (transparent huge pages; in their default "madvise"
    mode only memory that asks for them gets them). A decode step streams every weight once: with 4 KiB pages
    the TLB misses every 4 KiB of it (measured: quantize._on_huge_pages; SmolLM2 bf16 through the C++ step on a
    2-core EPYC (C), 2 threads, 3 alternating runs of 6-8 rounds: 93.5 / 111.0 / 113.6 tok/s against 91.9 /
    104.7 / 106.5). Nothing moves where huge pages are not offered, where the tensors are under 2 MiB in all,
    or where they already share one buffer (a second call). Returns whether they moved."""
    tensors = [t for t in tensors if t.device.type == "cpu" and t.numel()]
    if len({t.untyped_storage().data_ptr() for t in tensors}) <= 1:
        return False
    offsets, total = [], 0
    for t in tensors:
        total = -(-total // 64) * 64  # each tensor 64-byte aligned
        offsets.append(total)
        total += t.nbytes
    if total < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    buf = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without transparent huge pages
        return False
    view = ctypes.c_char.from_buffer(buf)
    start = -ctypes.addressof(view) % HUGE_PAGE  # the first 2 MiB boundary in it
    del view
    with torch.inference_mode(False):  # called from generate(): weights a later training step can still use
        arena = torch.frombuffer(buf, dtype=torch.uint8)  # holds `buf` (unmapped when the last tensor goes)
        for t, at in zip(tensors, offsets):
            moved = arena[start + at:start + at + t.nbytes].view(t.dtype).view(t.shape)
            moved.copy_(t.data)
            t.data = moved
    return True
