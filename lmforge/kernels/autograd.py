"""Hand-written autograd Functions for eager training: each saves less and makes fewer passes over memory than
the composite of torch ops it replaces, and, where `fused` (or `blas`) says the C++ kernels are loaded, runs
them in one pass on CPU (`fused.cpp`, `blas_mm.cpp`). Values and gradients equal the plain forms in
`lmforge/model.py` (tests/kernels). Compiled code uses the plain forms, which inductor fuses itself."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.data.labels import IGNORE
from lmforge.kernels.cpu import matmul


def hand_backward(*tensors: torch.Tensor) -> bool:
    """Whether to run the Functions below: in eager training only. Compiled code fuses the plain forms
    itself, and without a backward (inference) the plain forms cost less Python per call."""
    return not torch.compiler.is_compiling() and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _cpu_fp32(t: torch.Tensor) -> bool:
    """Whether t (fp32, CPU, contiguous) is what the fused CPU kernels take."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


class RMSNormFn(torch.autograd.Function):
    """RMSNorm with a hand-written backward: about half the passes over memory of the composite (pow, mean,
    rsqrt, mul, mul and their autograd). Same numbers as the plain form: statistics in fp32, normalised x
    cast to the input dtype, then times the weight (HF LLaMA). fused: one pass each way."""

    @staticmethod
    def forward(ctx, x, weight, eps, fused):
        ctx.fused = fused and _cpu_fp32(x) and weight.dtype == torch.float32 and weight.is_contiguous()
        if ctx.fused:  # saves x and rstd, xhat is recomputed in the backward
            y, rstd = torch.ops.lmforge.rms_norm(x.view(-1, x.shape[-1]), weight, eps)  # (N, D), (N,)
            ctx.save_for_backward(x, rstd, weight)
            return y.view(x.shape)
        xf = x.float()
        rstd = torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]) + eps)
        xhat = xf * rstd  # (..., dim) fp32
        ctx.save_for_backward(xhat, rstd, weight)
        return xhat.to(x.dtype) * weight

    @staticmethod
    def backward(ctx, grad):
        if ctx.fused:
            x, rstd, weight = ctx.saved_tensors
            D = x.shape[-1]
            dx, dw = torch.ops.lmforge.rms_norm_backward(grad.reshape(-1, D).contiguous(), x.view(-1, D), weight, rstd)
            return dx.view(x.shape), dw if ctx.needs_input_grad[1] else None, None, None
        xhat, rstd, weight = ctx.saved_tensors
        g = grad.float()
        dw = (g * xhat).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        gw = g * weight.float()
        # d/dx of x * rstd: rstd * (gw - xhat * mean(gw * xhat))
        dx = gw.sub_(xhat * torch.linalg.vecdot(gw, xhat).unsqueeze(-1).div_(xhat.shape[-1])).mul_(rstd)
        return dx.to(grad.dtype), None if dw is None else dw.to(weight.dtype), None, None


class SiluMulFn(torch.autograd.Function):
    """silu(gate) * up of the fused (..., 2F) projection: saves only the projection, and the backward writes
    both halves' gradients straight into one (..., 2F) tensor instead of concatenating them. fused: one pass
    each way on CPU."""

    @staticmethod
    def forward(ctx, gate_up, fused):
        ctx.save_for_backward(gate_up)
        ctx.fused = fused and _cpu_fp32(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)  # each (..., F)
        if ctx.fused:
            flat = gate_up.reshape(-1, gate_up.shape[-1]).chunk(2, dim=-1)  # (N, F) each
            return torch.ops.lmforge.silu_mul(*flat).view(up.shape)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        out = torch.empty_like(gate_up)
        if ctx.fused and grad.dtype == torch.float32:
            flat = gate_up.reshape(-1, gate_up.shape[-1]).chunk(2, dim=-1)
            torch.ops.lmforge.silu_mul_backward_(out.view(-1, out.shape[-1]), grad.reshape(-1, grad.shape[-1]).contiguous(), *flat)
            return out, None
        d_gate, d_up = out.chunk(2, dim=-1)
        torch.mul(grad, F.silu(gate), out=d_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=d_gate)
        return out, None


def rotate(x: torch.Tensor, C: torch.Tensor, S: torch.Tensor, interleaved: bool, fused: bool) -> torch.Tensor:
    """x * C + swap(x) * S (`model.apply_rope`) written pair member by pair member into a new tensor (no
    swapped copy of x); with `fused`, fp32 (B, T, H, D) on CPU in one pass."""
    r = C.shape[-1]
    if (fused and x.dim() == 4 and x.stride(-1) == 1 and C.dtype == S.dtype == torch.float32 and C.dim() in (3, 4)
            and C.shape[-2] == 1 and x.device.type == "cpu" and x.dtype == torch.float32):
        B, T = x.shape[:2]
        C3, S3 = (t.select(-2, 0).expand(B, T, r) for t in (C, S))  # (B, T, r); B's stride 0 for (T, 1, r)
        return torch.ops.lmforge.rope(x, C3, S3, interleaved)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if r < x.shape[-1]:
        out[..., r:] = x[..., r:]
    split, member = ((-1, 2), -1) if interleaved else ((2, -1), -2)  # pairs (2i, 2i + 1) or (i, i + r/2)
    xc = (x[..., :r] * C).unflatten(-1, split)
    xp, sp, op = x[..., :r].unflatten(-1, split), S.unflatten(-1, split), out[..., :r].unflatten(-1, split)
    for i in (0, 1):  # a' = a cos - b sin, b' = b cos + a sin
        torch.addcmul(xc.select(member, i), xp.select(member, 1 - i), sp.select(member, i), out=op.select(member, i))
    return out


class RoPEFn(torch.autograd.Function):
    """RoPE. A rotation's gradient is the rotation by the opposite angle (S -> -S), so the backward needs no
    saved activations."""

    @staticmethod
    def forward(ctx, x, C, S, interleaved, fused):
        ctx.save_for_backward(C, S)
        ctx.interleaved, ctx.fused = interleaved, fused
        return rotate(x, C, S, interleaved, fused)

    @staticmethod
    def backward(ctx, grad):
        C, S = ctx.saved_tensors
        return rotate(grad, C, -S, ctx.interleaved, ctx.fused), None, None, None, None


class CausalAttentionFn(torch.autograd.Function):
    """Causal softmax attention through `lmforge::causal_attention` and its backward (saves q, k, v, the
    output and the log-sum-exp per row, as flash attention does)."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = torch.ops.lmforge.causal_attention(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        dq, dk, dv = torch.ops.lmforge.causal_attention_backward(grad, *ctx.saved_tensors, ctx.scale)
        return dq, dk, dv, None


class BlasLinearFn(torch.autograd.Function):
    """x (N, in) @ w.T and its backward, each product through OpenBLAS (`matmul` with blas): saves what
    F.linear saves (x and w)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return matmul(x, w.T, blas=True)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        gx = matmul(grad, w, blas=True) if ctx.needs_input_grad[0] else None
        gw = matmul(grad.T, x, blas=True) if ctx.needs_input_grad[1] else None
        return gx, gw


class LinearCrossEntropyFn(torch.autograd.Function):
    """Summed cross-entropy of (hidden @ weight.T) against labels, a block of rows at a time: each block's
    logits become their own gradient in place (softmax minus one-hot), which is multiplied into the
    gradients of hidden and weight at once. The full (N, vocab) logits, their log-softmax and its gradient
    never exist together — the largest tensors of a training step on a big vocabulary."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, rows, fused, blas):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        empty = torch.empty_like if hidden.shape[0] else torch.zeros_like  # no rows: zero gradient
        grad_w = empty(weight, dtype=torch.float32) if want_w else None
        total = hidden.new_zeros((), dtype=torch.float32)
        fused = fused and hidden.device.type == "cpu" and labels.dtype == torch.long
        w = weight.to(hidden.dtype)  # once, not per block (a no-op when the dtypes agree)
        for s in range(0, hidden.shape[0], rows):
            h, y = hidden[s:s + rows], labels[s:s + rows]
            z = matmul(h, w.T, blas=blas).float()  # (rows, V)
            want = grad_h is not None or grad_w is not None
            # the block's loss; z becomes its gradient (fused: one row at a time, in cache)
            total += torch.ops.lmforge.softmax_xent_(z, y, IGNORE).sum() if fused else _block_xent_(z, y, want)
            if not want:
                continue
            g = z.to(hidden.dtype)
            if grad_h is not None:
                matmul(g, w, out=grad_h[s:s + rows], blas=blas)
            if grad_w is not None:  # the first block writes, the others add
                matmul(g.T.to(torch.float32), h.to(torch.float32), out=grad_w, beta=1.0 if s else 0.0, blas=blas)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype),
                None, None, None, None)


def _block_xent_(z: torch.Tensor, y: torch.Tensor, want_grad: bool) -> torch.Tensor:
    """Summed cross-entropy of logits z (rows, V) against labels y (rows,); with want_grad, z becomes the
    gradient of that sum in place (softmax minus one-hot, 0 where ignored)."""
    z.sub_(z.amax(-1, keepdim=True)).exp_()  # exp(z - max)
    denom = z.sum(-1, keepdim=True)  # (rows, 1)
    keep = (y != IGNORE)[:, None]  # (rows, 1)
    y = y.clamp_min(0)[:, None]
    total = ((denom.log() - z.gather(-1, y).log()) * keep).sum()  # log-sum-exp - z_label
    if want_grad:
        z.mul_(keep / denom).scatter_add_(-1, y, -keep.to(z.dtype))
    return total


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         block_logits: int = 1 << 23, *, fused: bool = False, blas: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain `LMHeadLoss` — summed cross-entropy of hidden @ weight.T against labels, and the counted
    tokens — without holding the (N, vocab) logits: hidden (..., dim), weight (vocab, dim), labels (...).
    Rows go through in blocks of about `block_logits` logits."""
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    rows = max(16, block_logits // weight.shape[0])
    return LinearCrossEntropyFn.apply(hidden, weight, labels, rows, fused, blas), (labels != IGNORE).sum()
