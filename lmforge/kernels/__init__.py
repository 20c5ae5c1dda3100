"""Fast paths, applied to a plain model by swapping modules: `accelerate(model)` (and `restore`, its
inverse). `model.py` stays the plain reference; nothing in it knows about this package.

- `modules.py`: the fast module classes and `accelerate`.
- `autograd.py`: hand-written autograd Functions for eager training (RMSNorm, SwiGLU, RoPE, causal
  attention, OpenBLAS linear, the blocked LM-head loss).
- `cpu.py`: what this CPU does well (emulated bf16/fp16, OpenBLAS or MKL), `matmul`, the `Plan`.
- `build.py`: building, caching and loading the C++ kernels (`half_gemv.cpp`: few-row bf16/fp16 products on
  CPUs without such instructions; `fused.cpp`: one-pass fp32 training element-wise ops; `blas_mm.cpp`: fp32
  products and causal attention through OpenBLAS, the scipy-openblas32 wheel).

Switches: arguments of `accelerate`, each with one environment override: LMFORGE_CPU_KERNELS=0 keeps torch's
ops everywhere; LMFORGE_CPU_BLAS=openblas|torch picks the fp32 product library on any CPU. Measured figures:
README and benchmarks/."""

from lmforge.kernels.cpu import prebuild
from lmforge.kernels.modules import accelerate, restore

__all__ = ["accelerate", "prebuild", "restore"]
