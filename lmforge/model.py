"""The whole decoder-only network, driven by `ModelConfig`: embedding -> blocks (pre-norm attention and
MLP, each with a residual) -> final norm -> LM head. One `forward` serves training and inference."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge import kernels
from lmforge.config import ModelConfig
from lmforge.kernels import HALF_GEMV
from lmforge.train.losses import linear_cross_entropy
from lmforge.utils import PlacementError


def _hand_backward(*tensors: torch.Tensor) -> bool:
    """Whether to run the hand-written autograd Functions below: in eager training only. Compiled code fuses
    the plain forms itself, and without a backward (inference) the plain forms cost less Python per call."""
    return not torch.compiler.is_compiling() and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ---- linear layers -------------------------------------------------------------------------------

_ROW_BLOCKS = 16  # row blocks of a one-row product on CPU (>= the threads it should spread over)
_KERNEL_ROWS = 8  # up to this many bf16/fp16 rows go through lmforge's kernel where it is loaded
_UPCAST_ROWS = 16  # from this many rows, a bf16/fp16 product on a CPU without such instructions runs in fp32


def _emulated_half() -> dict[torch.dtype, bool]:
    """Which half-precision matmuls this CPU lacks instructions for (bf16: AVX512-BF16 or AMX; fp16:
    AMX-FP16), so that oneDNN converts every element of both operands for every product (15 GFLOPS vs fp32's
    90 measured on a 2-core EPYC): there, converting the weight once and multiplying in fp32 is 2x (32 rows)
    to 4x (256) faster. Same result: a product of two bf16 (fp16) numbers is exact in fp32, and both sum in
    fp32."""
    has = {name: getattr(torch.cpu, name, lambda: False)() for name in
           ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported")}
    return {torch.bfloat16: not (has["_is_avx512_bf16_supported"] or has["_is_amx_tile_supported"]),
            torch.float16: not has["_is_amx_fp16_supported"]}


_EMULATED_HALF = _emulated_half()  # read once: a plain dict lookup in forward (also under torch.compile)


class Linear(nn.Linear):
    """nn.Linear with two CPU inference paths chosen by measurement:
    - one fp32 row (batch-1 decoding): MKL's matrix-vector product runs on one thread there (a 2-core EPYC:
      7 GB/s at 1 and 2 threads), so the weight is multiplied as a batch of row blocks, which spreads over
      every thread (13-15 GB/s; under torch.compile inductor turns it into its own vectorised reduction, as
      fast). bf16 keeps F.linear: oneDNN's kernel already uses every thread.
    - one to eight bf16/fp16 rows on a CPU that emulates those matmuls, once `kernels.load_half_gemv()`
      built it (generation does): lmforge's own kernel (`kernels/half_gemv.cpp`), 1.4x oneDNN's at one row,
      3x at eight (it reads each weight row once for all rows, and sums each row alike whatever their number).
    - many bf16/fp16 rows (a prompt's prefill) without a backward, on a CPU that emulates those matmuls
      (`_EMULATED_HALF`): in fp32.
    `out_fp32` (the LM head sets it) returns fp32: logits of a half model are not rounded to its dtype where
    the product was summed in fp32 (both CPU paths above), so near-ties between tokens (25.33 vs 25.24 are
    both 25.5 in bf16) are decided as in fp32; elsewhere the rounded product is returned as fp32."""

    out_fp32 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.device.type != "cpu":
            return self._out(F.linear(x, w, self.bias))
        rows = x.numel() // max(x.shape[-1], 1)
        inference = not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        same = inference and x.dtype == w.dtype  # the half paths below (which dtypes: their dicts)
        if same and 0 < rows <= _KERNEL_ROWS and HALF_GEMV.get(x.dtype, False) and w.is_contiguous():
            y = torch.ops.lmforge.half_gemv(w, x.reshape(rows, -1), self.out_fp32)  # (rows, out)
        elif rows == 1 and x.dtype == torch.float32 and w.shape[0] % _ROW_BLOCKS == 0 and w.is_contiguous():
            blocks = w.view(_ROW_BLOCKS, w.shape[0] // _ROW_BLOCKS, w.shape[1])  # (G, out / G, in)
            y = torch.bmm(blocks, x.reshape(1, -1).T.expand(_ROW_BLOCKS, -1, 1))  # (G, out / G, 1)
        elif (x.dtype == w.dtype == torch.float32 and rows >= _UPCAST_ROWS and kernels.blas_on()
              and not torch.compiler.is_compiling()):
            y = _BlasLinearFn.apply(x.reshape(rows, -1), w)  # (rows, out)
        elif same and rows >= _UPCAST_ROWS and _EMULATED_HALF.get(x.dtype, False):
            bias = None if self.bias is None else self.bias.float()
            y = F.linear(x.float(), w.float(), bias)
            return y if self.out_fp32 else y.to(x.dtype)
        else:
            return self._out(F.linear(x, w, self.bias))
        y = y.view(*x.shape[:-1], w.shape[0])  # (..., out)
        return y if self.bias is None else y + self.bias

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        return y.float() if self.out_fp32 else y


class _BlasLinearFn(torch.autograd.Function):
    """x (N, in) @ w.T and its backward, each product through `kernels.matmul` (OpenBLAS on CPUs where it
    beats MKL): saves what F.linear saves (x and w)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return kernels.matmul(x, w.T)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        gx = kernels.matmul(grad, w) if ctx.needs_input_grad[0] else None
        gw = kernels.matmul(grad.T, x) if ctx.needs_input_grad[1] else None
        return gx, gw


# ---- norms -----------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (LLaMA, ChatGLM2)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _hand_backward(x, self.weight):
            return _RMSNormFn.apply(x, self.weight, self.eps)
        if x.dtype == self.weight.dtype == torch.float32:  # the same product, in one call
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm with a hand-written backward, for eager mode: about half the passes over memory of the
    composite (pow, mean, rsqrt, mul, mul and their autograd), which matters on CPU. Same numbers as the
    plain form: statistics in fp32, normalised x cast to the input dtype, then times the weight (HF LLaMA).
    fp32 on a CPU with AVX2: one pass each way (`kernels/fused.cpp`)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.fused = _fused(x) and weight.dtype == torch.float32 and weight.is_contiguous()
        if ctx.fused:  # one pass (kernels/fused.cpp); saves x and rstd, xhat is recomputed in the backward
            y, rstd = torch.ops.lmforge.rms_norm(x.view(-1, x.shape[-1]), weight, eps)
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
            return dx.view(x.shape), dw if ctx.needs_input_grad[1] else None, None
        xhat, rstd, weight = ctx.saved_tensors
        g = grad.float()
        dw = (g * xhat).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        gw = g * weight.float()
        # d/dx of x * rstd: rstd * (gw - xhat * mean(gw * xhat))
        dx = gw.sub_(xhat * torch.linalg.vecdot(gw, xhat).unsqueeze(-1).div_(xhat.shape[-1])).mul_(rstd)
        return dx.to(grad.dtype), None if dw is None else dw.to(weight.dtype), None


class LayerNorm(nn.LayerNorm):
    """(x - mean) / std * weight + bias (GPT-2, BLOOM)."""


def make_norm(c: ModelConfig) -> nn.Module:
    return RMSNorm(c.dim, c.norm_eps) if c.norm == "rmsnorm" else LayerNorm(c.dim, eps=c.norm_eps)


# ---- positions ---------------------------------------------------------------------------------------


def rope_tables(c: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation factors (C, S) of every position, each (max_seq_len, rope_dim), fp32, laid out so that
    rotating is `x * C + swap(x) * S` (see `apply_rope`): C repeats cos(position * inv_freq) and S holds
    -sin / +sin for the first / second member of each rotated pair."""
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.rope_dim, 2, device=device).float() / c.rope_dim))
    angles = torch.outer(torch.arange(c.max_seq_len, device=device).float(), inv_freq)  # (max_seq_len, r/2)
    cos, sin = angles.cos(), angles.sin()
    if c.rope_interleaved:  # pairs (2i, 2i + 1)
        return cos.repeat_interleave(2, -1), torch.stack((-sin, sin), -1).flatten(-2)
    return torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)  # pairs (i, i + r/2)


def apply_rope(x: torch.Tensor, C: torch.Tensor, S: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotates the first r = C.shape[-1] dims of x (..., head_dim); C, S (from `rope_tables`) broadcast.

    Half-split (LLaMA in HF layout) pairs x[i] with x[i + r/2]; interleaved (ChatGLM2, Meta LLaMA) pairs
    x[2i] with x[2i + 1]. Either way each pair (a, b) becomes (a cos - b sin, b cos + a sin), that is
    x * C + swap(x) * S with swap exchanging the members of each pair. The rest of the head (partial
    rotary) passes through."""
    C, S = C.to(x.dtype), S.to(x.dtype)  # no-ops except under autocast (fp32 tables, bf16 projections)
    if _hand_backward(x):
        return _RoPE.apply(x, C, S, interleaved)
    r = C.shape[-1]
    rot = x[..., :r]
    swapped = rot.unflatten(-1, (-1, 2) if interleaved else (2, -1)).flip(-1 if interleaved else -2).flatten(-2)
    out = torch.addcmul(rot * C, swapped, S)
    return torch.cat((out, x[..., r:]), dim=-1) if r < x.shape[-1] else out


def _rotate(x: torch.Tensor, C: torch.Tensor, S: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x * C + swap(x) * S written pair member by pair member into a new tensor (no swapped copy of x); for
    fp32 (B, T, H, D) on a CPU with AVX2, in one pass (`kernels/fused.cpp`)."""
    r = C.shape[-1]
    if (x.dim() == 4 and x.stride(-1) == 1 and C.dtype == S.dtype == torch.float32 and C.dim() in (3, 4)
            and C.shape[-2] == 1 and x.device.type == "cpu" and x.dtype == torch.float32 and kernels.fused_on()):
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


class _RoPE(torch.autograd.Function):
    """RoPE for eager mode. A rotation's gradient is the rotation by the opposite angle (S -> -S), so the
    backward needs no saved activations."""

    @staticmethod
    def forward(ctx, x, C, S, interleaved):
        ctx.save_for_backward(C, S)
        ctx.interleaved = interleaved
        return _rotate(x, C, S, interleaved)

    @staticmethod
    def backward(ctx, grad):
        C, S = ctx.saved_tensors
        return _rotate(grad, C, -S, ctx.interleaved), None, None, None


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-head slopes of ALiBi (Press et al.): a geometric sequence, interleaved when n is not a power of 2."""
    p = 2 ** math.floor(math.log2(n_heads))
    slopes = [2 ** (-8 * (i + 1) / p) for i in range(p)]
    if p < n_heads:
        slopes += [2 ** (-4 * (2 * i + 1) / p) for i in range(n_heads - p)]
    return torch.tensor(slopes)


def sinusoidal_table(max_len: int, dim: int) -> torch.Tensor:
    """The fixed sin/cos position embeddings of "Attention Is All You Need": (max_len, dim)."""
    pos = torch.arange(max_len).float()[:, None]
    div = torch.exp(torch.arange(0, dim, 2).float() * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim)
    table[:, 0::2], table[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    return table


# ---- attention with a static KV cache -------------------------------------------------------------------


class KVCache(nn.Module):
    """Static K/V buffers (B, n_kv_heads, max_len, head_dim), written at the given positions."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[: k.shape[0], :, pos] = k
        self.v[: v.shape[0], :, pos] = v
        return self.k[: k.shape[0]], self.v[: v.shape[0]]


class Attention(nn.Module):
    """Multi-head attention with one fused QKV projection; n_kv_heads < n_heads gives GQA / MQA."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.qkv = Linear(c.dim, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, bias=c.qkv_bias)
        self.out = Linear(c.n_heads * c.head_dim, c.dim, bias=c.bias)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: tuple | None, mask: torch.Tensor | None, pos: torch.Tensor | None,
                interleaved: bool) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        # split, not slicing: the backward of split is one concatenation, that of a slice a zero-filled copy
        qk, v = self.qkv(x).view(B, T, H + 2 * K, D).split([H + K, K], dim=2)  # heads of q and k; of v
        if rope is not None:
            qk = apply_rope(qk, *rope, interleaved)  # q and k rotated together
        q, k = qk.split([H, K], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D), (B, K, T, D) x2
        if self.cache is not None:
            k, v = self.cache.update(pos, k, v)  # (B, K, max_len, D)
            if mask is not None and mask.shape[-1] < k.shape[2]:  # attend only to the filled prefix
                k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]
        if K != H and T == 1:
            # decoding: the H // K query heads that share a K/V head attend as H // K query rows of it, so
            # the cache is read as it is, never expanded (a copy of all of it, every layer, every token)
            q = q.reshape(B, K, H // K, D)  # (B, K, G, D)
            if mask is not None and mask.shape[1] == H:  # per-head ALiBi bias (B|1, H, 1, S)
                mask = mask.reshape(mask.shape[0], K, H // K, mask.shape[-1])  # (B|1, K, G, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).view(B, H, 1, D)  # (B, H, 1, D)
            return self.out(y.transpose(1, 2).reshape(B, T, H * D))  # (B, 1, dim)
        if (mask is None and T > 1 and self.cache is None and _hand_backward(x) and q.dtype == torch.float32
                and q.device.type == "cpu" and B * K >= torch.get_num_threads() and kernels.blas_on()):
            # training on CPU where OpenBLAS is chosen: lmforge's causal attention (kernels/blas_mm.cpp)
            y = _CausalAttentionFn.apply(q, k, v, D ** -0.5)
            return self.out(y.transpose(1, 2).reshape(B, T, H * D))  # (B, T, H * D): no copy
        # GQA: the kernels (flash on CUDA and CPU) read each shared K/V head in place for its H // K query heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=K != H)
        return self.out(y.transpose(1, 2).reshape(B, T, H * D))  # (B, T, H * D) -> (B, T, dim)


class _CausalAttentionFn(torch.autograd.Function):
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


# ---- MLPs ----------------------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul (ChatGLM2's dense_h_to_4h)."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.gate_up = Linear(c.dim, 2 * c.ffn_dim, bias=c.bias)
        self.down = Linear(c.ffn_dim, c.dim, bias=c.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)  # (B, T, 2 * ffn_dim)
        if _hand_backward(gate_up):
            return self.down(_SiluMul.apply(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)  # each (B, T, ffn_dim)
        return self.down(F.silu(gate) * up)


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up of the fused (..., 2F) projection, for eager mode: saves only the projection, and the
    backward writes both halves' gradients straight into one (..., 2F) tensor instead of concatenating them.
    On a CPU with AVX2, fp32: one pass each way (`kernels/fused.cpp`), 1.6x and 2x torch's ops."""

    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)  # each (..., F)
        if _fused(gate_up):
            flat = gate_up.reshape(-1, gate_up.shape[-1]).chunk(2, dim=-1)  # (N, F) each
            return torch.ops.lmforge.silu_mul(*flat).view(up.shape)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        out = torch.empty_like(gate_up)
        if _fused(gate_up) and grad.dtype == torch.float32:
            flat = gate_up.reshape(-1, gate_up.shape[-1]).chunk(2, dim=-1)
            torch.ops.lmforge.silu_mul_backward_(out.view(-1, out.shape[-1]), grad.reshape(-1, grad.shape[-1]).contiguous(), *flat)
            return out
        d_gate, d_up = out.chunk(2, dim=-1)
        torch.mul(grad, F.silu(gate), out=d_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=d_gate)
        return out


def _fused(t: torch.Tensor) -> bool:
    """Whether t (fp32, CPU, contiguous) goes through the fused CPU kernels."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and kernels.fused_on()


class GeluMLP(nn.Module):
    """down(gelu(up(x))) — GPT-2, BLOOM."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.up = Linear(c.dim, c.ffn_dim, bias=c.bias)
        self.down = Linear(c.ffn_dim, c.dim, bias=c.bias)
        self.approximate = c.gelu_approx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.attn_norm, self.attn = make_norm(c), Attention(c)
        self.mlp_norm, self.mlp = make_norm(c), (SwiGLU(c) if c.mlp == "swiglu" else GeluMLP(c))

    def forward(self, x, rope, mask, pos, interleaved):
        x = x + self.attn(self.attn_norm(x), rope, mask, pos, interleaved)
        return x + self.mlp(self.mlp_norm(x))


# ---- the model ----------------------------------------------------------------------------------------------


class Transformer(nn.Module):
    """A decoder-only language model; `forward(input_ids) -> logits (B, T, vocab_size)`, fp32 for every dtype."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = self.config = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.dim)
        self.pos_emb = nn.Embedding(c.max_seq_len, c.dim) if c.position == "learned" else None
        self.emb_norm = make_norm(c) if c.embed_norm else None
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = make_norm(c)
        self.lm_head = Linear(c.dim, c.vocab_size, bias=False)
        self.lm_head.out_fp32 = True  # logits in fp32 whatever the model's dtype
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_buffers()
        if self.tok_emb.weight.device.type != "meta":
            self.apply(self._init_weights)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)computes the non-learned tables (RoPE, ALiBi, sinusoidal) — after building on `meta`."""
        c = self.config
        device = device or self.tok_emb.weight.device
        none = torch.empty(0, device=device)
        cos, sin = rope_tables(c, device) if c.position == "rope" else (none, none)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, rope_dim): C of apply_rope
        self.register_buffer("rope_sin", sin, persistent=False)  # S of apply_rope
        slopes = alibi_slopes(c.n_heads).to(device) if c.position == "alibi" else none
        self.register_buffer("alibi", slopes, persistent=False)  # (n_heads,)
        table = sinusoidal_table(c.max_seq_len, c.dim).to(device) if c.position == "sinusoidal" else none
        self.register_buffer("sinusoid", table, persistent=False)  # (max_seq_len, dim)

    def _init_weights(self, m: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(m, nn.Linear):
            # residual-branch outputs scaled by 1/sqrt(2 * n_layers) (GPT-2)
            is_out = any(m is b.attn.out or m is b.mlp.down for b in self.layers)
            nn.init.normal_(m.weight, std=std / math.sqrt(2 * self.config.n_layers) if is_out else std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_emb.weight.dtype

    def setup_cache(self, batch: int, max_len: int | None = None) -> None:
        """Creates a static KV cache for `batch` sequences of up to `max_len` tokens (generation)."""
        c = self.config
        max_len = max_len or c.max_seq_len
        if max_len > c.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={c.max_seq_len}")
        for b in self.layers:
            b.attn.cache = KVCache(batch, max_len, c.n_kv_heads, c.head_dim, self.dtype, self.device)

    def clear_cache(self) -> None:
        for b in self.layers:
            b.attn.cache = None

    @property
    def cache_len(self) -> int | None:
        cache = self.layers[0].attn.cache if len(self.layers) else None
        return None if cache is None else cache.k.shape[2]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None, labels: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, vocab) for `input_ids` (B, T) — or, given `labels`, the training loss.

        positions: (T,) where these tokens sit in the sequence, and their KV-cache slots; default 0..T-1.
        mask: optional bool (B or 1, 1, T, S) — True where a query may attend to a key; default causal.
          With a cache, S is the number of filled slots (keys beyond are ignored).
        position_ids: optional (B, T) per-row positions for the position encoding (left-padded batches).
        logits_at: optional bool (B, T): compute the LM head only there and return (N, vocab) logits for
          the N selected positions — fine-tuning needs them at answer tokens only (saves the big matmul).
        labels: optional (B, T) next tokens (IGNORE = -100 where nothing counts): returns (summed
          cross-entropy, number of counted tokens) instead of logits — computed by `linear_cross_entropy`
          without ever holding the (B, T, vocab) logits, the biggest tensors of a training step.
        """
        c = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        input_ids = input_ids.to(self.device)
        B, T = input_ids.shape
        cached = self.layers[0].attn.cache is not None if len(self.layers) else False
        if positions is None:
            if cached:
                raise ValueError("with a KV cache set up, pass `positions` (the slots these tokens fill)")
            positions = torch.arange(T, device=self.device)
        positions = positions.to(self.device)
        limit = self.cache_len if cached else c.max_seq_len
        if T > c.max_seq_len or (not torch.compiler.is_compiling() and int(positions[-1]) >= limit):
            raise ValueError(f"sequence of {int(positions[-1]) + 1} tokens exceeds the limit of {limit} "
                             f"({'KV cache length' if cached else 'max_seq_len'})")
        pos_ids = positions if position_ids is None else position_ids.to(self.device)  # (T,) or (B, T)

        x = self.tok_emb(input_ids)  # (B, T, dim)
        if c.position == "learned":
            x = x + self.pos_emb(pos_ids)
        elif c.position == "sinusoidal":
            x = x + self.sinusoid[pos_ids].to(x.dtype)
        if self.emb_norm is not None:
            x = self.emb_norm(x)

        rope = None
        if c.position == "rope":
            # (T, 1, r) or (B, T, 1, r): broadcast over the heads of (B, T, heads, head_dim); cast once here
            rope = (self.rope_cos[pos_ids][..., None, :].to(x.dtype), self.rope_sin[pos_ids][..., None, :].to(x.dtype))

        if cached and mask is None:
            # causal over cache slots: key slot j visible to the query at slot i when j <= i
            n = int(positions[-1]) + 1 if not torch.compiler.is_compiling() else self.cache_len
            mask = positions[:, None] >= torch.arange(n, device=self.device)  # (T, S)
        needs_float = c.position == "alibi" or c.sliding_window is not None
        if needs_float or (mask is not None and mask.dim() == 2):
            mask = self._mask(positions, mask, T, x.dtype)
        try:
            for block in self.layers:
                x = block(x, rope, mask, positions, c.rope_interleaved)
            x = self.norm(x)
            if logits_at is not None:
                logits_at = logits_at.to(x.device)
                x, labels = x[logits_at], (None if labels is None else labels.to(x.device)[logits_at])
            if labels is not None:
                return linear_cross_entropy(x, self.lm_head.weight, labels.to(x.device))
            return self.lm_head(x)
        except RuntimeError as e:
            msg = str(e)
            if any(s in msg.lower() for s in ("same device", "same dtype", "expected scalar type")):
                raise PlacementError(f"device/dtype mix-up: {self._placement()}; inputs on {input_ids.device}, "
                                   f"mask {None if mask is None else (mask.device, mask.dtype)}. "
                                   f"Move the whole model with model.to(...). ({msg.splitlines()[0]})") from e
            raise

    def _placement(self) -> str:
        """Where the parameters live, e.g. "parameters on cpu/float32 (10), cuda:0/bfloat16 (2)"."""
        seen: dict[str, int] = {}
        for p in self.parameters():
            key = f"{p.device}/{str(p.dtype).removeprefix('torch.')}"
            seen[key] = seen.get(key, 0) + 1
        return "parameters on " + ", ".join(f"{k} ({n})" for k, n in seen.items())

    def _mask(self, positions: torch.Tensor, mask: torch.Tensor | None, T: int, dtype) -> torch.Tensor:
        """Adds causality, the sliding window and ALiBi to `mask`; returns a (B|1, H|1, T, S) mask."""
        c = self.config
        if mask is None:
            mask = positions[:, None] >= torch.arange(T, device=self.device)  # (T, T) causal
        if mask.dim() == 2:
            mask = mask[None, None]  # (1, 1, T, S)
        S = mask.shape[-1]
        rel = torch.arange(S, device=self.device) - positions[:, None]  # (T, S): key - query, <= 0 visible
        if c.sliding_window is not None:
            mask = mask & (rel > -c.sliding_window)
        if c.position != "alibi":
            return mask
        bias = self.alibi.to(dtype)[:, None, None] * rel.to(dtype)  # (H, T, S)
        return bias.masked_fill(~mask, float("-inf"))  # (B|1, H, T, S)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        return n
