"""The fast forms of `model.py`'s modules, and `accelerate`, which swaps them in by `setattr` as
`lmforge.lora` swaps adapters in. Each fast class subclasses the plain one, shares its parameters, and falls
back to the plain forward wherever its fast path does not apply (another device or dtype, compiled code,
inference for the training kernels), so a swapped model computes what the plain one does.

Quantized linears (`lmforge.quantize`, next) are a swap of the same kind: `accelerate` only replaces modules
whose type is exactly a plain one, so it leaves theirs (and LoRA's wrappers, whose base it does swap) alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.kernels.autograd import (
    BlasLinearFn,
    CausalAttentionFn,
    RMSNormFn,
    RoPEFn,
    SiluMulFn,
    hand_backward,
    linear_cross_entropy,
)
from lmforge.kernels.cpu import Plan, make_plan
from lmforge.model import LMHeadLoss, RMSNorm, RoPE, SoftmaxAttention, SwiGLU

ROW_BLOCKS = 16  # row blocks of a one-row fp32 product on CPU (>= the threads it should spread over)
KERNEL_ROWS = 8  # up to this many bf16/fp16 rows go through lmforge::half_gemv where it is loaded
UPCAST_ROWS = 16  # from this many rows, an emulated bf16/fp16 inference product runs in fp32


class CpuLinear(nn.Linear):
    """nn.Linear with the CPU products chosen by measurement (figures: README, benchmarks/):
    - one to eight bf16/fp16 rows without a backward, where this CPU emulates those matmuls and the kernel is
      loaded: lmforge::half_gemv (each weight row read once for all rows, summed alike whatever their number);
    - one fp32 row (batch-1 decoding): the weight multiplied as a batch of row blocks, which spreads over every
      thread where MKL's matrix-vector product takes one (under torch.compile inductor makes it its own
      vectorised reduction);
    - fp32 with at least 16 rows where OpenBLAS is chosen: OpenBLAS, forward and backward;
    - many bf16/fp16 rows without a backward on a CPU that emulates those matmuls: the weight converted once
      and multiplied in fp32.
    `out_fp32` (the LM head's) returns the fp32 sum where a path sums in fp32, so near-ties between tokens
    (25.33 vs 25.24 are both 25.5 in bf16) are decided as in fp32."""

    plan = Plan()
    out_fp32 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, plan = self.weight, self.plan
        if x.device.type != "cpu":
            return F.linear(x, w, self.bias)
        rows = x.numel() // max(x.shape[-1], 1)
        inference = not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        same = inference and x.dtype == w.dtype  # the half paths below (which dtypes: the plan's sets)
        if same and 0 < rows <= KERNEL_ROWS and x.dtype in plan.half_gemv and w.is_contiguous():
            y = torch.ops.lmforge.half_gemv(w, x.reshape(rows, -1), self.out_fp32)  # (rows, out)
        elif rows == 1 and x.dtype == torch.float32 and w.shape[0] % ROW_BLOCKS == 0 and w.is_contiguous():
            blocks = w.view(ROW_BLOCKS, w.shape[0] // ROW_BLOCKS, w.shape[1])  # (G, out / G, in)
            y = torch.bmm(blocks, x.reshape(1, -1).T.expand(ROW_BLOCKS, -1, 1))  # (G, out / G, 1)
        elif (plan.blas and x.dtype == w.dtype == torch.float32 and rows >= UPCAST_ROWS
              and not torch.compiler.is_compiling()):
            y = BlasLinearFn.apply(x.reshape(rows, -1), w)  # (rows, out)
        elif same and rows >= UPCAST_ROWS and x.dtype in plan.upcast:
            bias = None if self.bias is None else self.bias.float()
            y = F.linear(x.float(), w.float(), bias)
            return y if self.out_fp32 else y.to(x.dtype)
        else:
            return F.linear(x, w, self.bias)
        y = y.view(*x.shape[:-1], w.shape[0])  # (..., out)
        return y if self.bias is None else y + self.bias


class FusedRMSNorm(RMSNorm):
    """RMSNorm; in eager training through `RMSNormFn` (one pass each way on CPU with the fused kernels)."""

    plan = Plan()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hand_backward(x, self.weight):
            return RMSNormFn.apply(x, self.weight, self.eps, self.plan.fused)
        return super().forward(x)


class FusedSwiGLU(SwiGLU):
    """SwiGLU; in eager training silu(gate) * up through `SiluMulFn`."""

    plan = Plan()

    def gated(self, gate_up: torch.Tensor) -> torch.Tensor:
        if hand_backward(gate_up):
            return SiluMulFn.apply(gate_up, self.plan.fused)
        return super().gated(gate_up)


class FusedRoPE(RoPE):
    """RoPE; in eager training through `RoPEFn` (no saved activations; one pass on CPU)."""

    plan = Plan()

    def forward(self, x: torch.Tensor, C: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        if hand_backward(x):
            C, S = C.to(x.dtype), S.to(x.dtype)  # no-ops except under autocast
            return RoPEFn.apply(x, C, S, self.interleaved, self.plan.fused)
        return super().forward(x, C, S)


class BlasAttention(SoftmaxAttention):
    """Causal attention for fp32 CPU training where OpenBLAS is chosen: lmforge::causal_attention (64 query
    rows at a time against the keys they may see; dK/dV of a K/V head in its own task). Masks, ALiBi,
    inference, compiled code and fewer sequence x K/V-head tasks than threads keep SDPA.
    Decoding (one new token, no gradient, CPU, compiled or not): lmforge::decode_attention, the G query heads
    that share a K/V head read it once (SDPA's flash loop is built for long query blocks: ~4x the time here)."""

    plan = Plan()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, H, T, D = q.shape
        K = k.shape[1]
        if (self.plan.decode_attention and T == 1 and q.device.type == "cpu" and D % 8 == 0
                and q.dtype == k.dtype == v.dtype and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
                and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
                and (mask is None or mask.dim() == 4 and mask.dtype in (torch.bool, torch.float32))):
            if mask is not None and mask.shape[1] == H and K != H:  # per-head ALiBi bias (B|1, H, 1, S)
                mask = mask.reshape(mask.shape[0], K, H // K, mask.shape[-1])  # (B|1, K, G, S)
            y = torch.ops.lmforge.decode_attention(q.reshape(B, K, H // K, D), k, v, mask, D ** -0.5)
            return y.view(B, H, 1, D)
        if (self.plan.blas and mask is None and T > 1 and hand_backward(q, k, v) and q.dtype == torch.float32
                and q.device.type == "cpu" and B * K >= torch.get_num_threads()):
            return CausalAttentionFn.apply(q, k, v, D ** -0.5)  # (B, H, T, D), laid out as (B, T, H, D)
        return super().forward(q, k, v, mask)


class BlockedHeadLoss(LMHeadLoss):
    """The LM head and its loss a block of rows at a time (`linear_cross_entropy`): never the (N, vocab)
    logits. Compiled code (which fuses the plain form itself) and autocast keep the plain form."""

    plan = Plan()
    block_logits = 1 << 23

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling() or torch.is_autocast_enabled(hidden.device.type):
            return super().forward(hidden, weight, labels)
        return linear_cross_entropy(hidden, weight, labels, self.block_logits, fused=self.plan.fused,
                                    blas=self.plan.blas)


FAST: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: CpuLinear, RMSNorm: FusedRMSNorm, SwiGLU: FusedSwiGLU, RoPE: FusedRoPE,
    SoftmaxAttention: BlasAttention, LMHeadLoss: BlockedHeadLoss,
}
PLAIN = {fast: plain for plain, fast in FAST.items()}


def _swapped(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A `cls` module sharing `module`'s parameters, buffers, submodules and attributes (the same Parameter
    objects: tied weights and an optimizer's references hold)."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    return new


def _swap(model: nn.Module, classes: dict[type[nn.Module], type[nn.Module]], plan: Plan | None
          ) -> tuple[nn.Module, list[nn.Module]]:
    """Replaces, by setattr on its parent, every module whose type is exactly a key of `classes` by one of
    the value's class (`model` itself too: then the returned root is new). Returns the root and the
    modules of the value classes, which get `plan` (None: it is removed)."""
    root = _swapped(model, classes[type(model)]) if type(model) in classes else model
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in classes:
                setattr(parent, name, _swapped(child, classes[type(child)]))
    done = [m for m in root.modules() if type(m) in classes.values()]
    for m in done:
        if plan is not None:
            m.plan = plan
        else:
            m.__dict__.pop("plan", None)
    return root, done


def accelerate(model: nn.Module, *, training: bool = True, cpu_kernels: bool | None = None,
               blas: str | None = None, plan: Plan | None = None) -> nn.Module:
    """Swaps the fast modules into `model` (in place; returned, a new object only where `model` itself is a
    swapped module) and loads the kernels they will use, building them on first use (~20 s each, cached; the
    training ones in parallel). Safe to call again: the modules already swapped get the new plan. `fit` calls
    it before wrapping the model for DDP/FSDP, and generation and evaluation before they run it.

    training: whether the model is about to train (the fused kernels) or only to run (the decoding ones).
    cpu_kernels: whether lmforge's C++ kernels may run; None reads LMFORGE_CPU_KERNELS (=0: never).
    blas: 'openblas' or 'torch' for fp32 CPU products; None reads LMFORGE_CPU_BLAS (unset: OpenBLAS on x86
      Linux CPUs that are not Intel's).
    plan: the paths to take, instead of deciding them (tests; the kernels it names must be loaded)."""
    if plan is None:
        p = next(model.parameters(), None)
        device, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
        plan = make_plan(device, dtype, training, cpu_kernels, blas)
    model, _ = _swap(model, FAST, plan)
    head = getattr(model, "lm_head", None)
    if isinstance(head, CpuLinear):
        head.out_fp32 = True  # logits in fp32 whatever the model's dtype
    return model


def restore(model: nn.Module) -> nn.Module:
    """The inverse of `accelerate`: the plain modules back, sharing the same parameters."""
    model, plain = _swap(model, PLAIN, None)
    for m in plain:
        m.__dict__.pop("out_fp32", None)
    return model
