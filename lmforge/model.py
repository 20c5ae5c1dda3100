"""The whole decoder-only network, driven by `ModelConfig`: embedding -> blocks (pre-norm attention and
MLP, each with a residual) -> final norm -> LM head. One `forward` serves training and inference.

Everything here is the plain form, the reference: `lmforge.kernels.accelerate(model)` swaps faster modules in
(fused CPU kernels, OpenBLAS products, a blocked LM-head loss), as `lmforge.lora` swaps adapters in."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.data.labels import IGNORE

# ---- norms -----------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (LLaMA, ChatGLM2)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # the same product, in one call
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight  # (HF LLaMA)


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
    r = C.shape[-1]
    rot = x[..., :r]
    swapped = rot.unflatten(-1, (-1, 2) if interleaved else (2, -1)).flip(-1 if interleaved else -2).flatten(-2)
    out = torch.addcmul(rot * C, swapped, S)
    return torch.cat((out, x[..., r:]), dim=-1) if r < x.shape[-1] else out


class RoPE(nn.Module):
    """Rotary position embedding (no weights): `apply_rope` with the model's pair layout."""

    def __init__(self, interleaved: bool) -> None:
        super().__init__()
        self.interleaved = interleaved

    def forward(self, x: torch.Tensor, C: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        return apply_rope(x, C, S, self.interleaved)


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
    """Static K/V buffers (batch, n_kv_heads, max_len, head_dim), written at the given positions. Each row is
    one sequence; with per-row positions the rows may hold sequences of different lengths (a server's slots)."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: slice | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes k, v (B, K, T, D) at slots `pos`: (T,) the same for every row, or (B, T) each row's own. `rows`:
        the cache rows these B rows are (default the first B). Returns those rows' buffers (B, K, max_len, D)."""
        if rows is None and pos.dim() == 1:
            self.k[: k.shape[0], :, pos] = k
            self.v[: v.shape[0], :, pos] = v
            return self.k[: k.shape[0]], self.v[: v.shape[0]]
        rows = slice(0, k.shape[0]) if rows is None else rows
        keys, values = self.k[rows], self.v[rows]  # views (B, K, max_len, D)
        if pos.dim() == 1:
            keys[:, :, pos], values[:, :, pos] = k, v
        else:
            row = torch.arange(k.shape[0], device=pos.device)[:, None]  # (B, 1): with pos (B, T), one slot each
            keys[row, :, pos], values[row, :, pos] = k.transpose(1, 2), v.transpose(1, 2)  # indexed (B, T, K, D)
        return keys, values


class SoftmaxAttention(nn.Module):
    """softmax(q·kᵀ / √d + mask)·v for each head (no weights); causal when no mask is given. q (B, H, T, D),
    k and v (B, K, S, D) with K dividing H (GQA / MQA); returns (B, H, T, D)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, H, T, D = q.shape
        K = k.shape[1]
        if K != H and T == 1:
            # decoding: the H // K query heads that share a K/V head attend as H // K query rows of it, so
            # the cache is read as it is, never expanded (a copy of all of it, every layer, every token)
            q = q.reshape(B, K, H // K, D)  # (B, K, G, D)
            if mask is not None and mask.shape[1] == H:  # per-head ALiBi bias (B|1, H, 1, S)
                mask = mask.reshape(mask.shape[0], K, H // K, mask.shape[-1])  # (B|1, K, G, S)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).view(B, H, 1, D)  # (B, H, 1, D)
        # GQA: the kernels (flash on CUDA and CPU) read each shared K/V head in place for its H // K query heads
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                              enable_gqa=K != H)


class Attention(nn.Module):
    """Multi-head attention with one fused QKV projection; n_kv_heads < n_heads gives GQA / MQA."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.qkv = nn.Linear(c.dim, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, bias=c.qkv_bias)
        self.out = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=c.bias)
        self.rope = RoPE(c.rope_interleaved) if c.position == "rope" else None
        self.attend = SoftmaxAttention()
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: tuple | None, mask: torch.Tensor | None,
                pos: torch.Tensor | None, rows: slice | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        # split, not slicing: the backward of split is one concatenation, that of a slice a zero-filled copy
        qk, v = self.qkv(x).view(B, T, H + 2 * K, D).split([H + K, K], dim=2)  # heads of q and k; of v
        if rope is not None:
            qk = self.rope(qk, *rope)  # q and k rotated together
        q, k = qk.split([H, K], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D), (B, K, T, D) x2
        if self.cache is not None:
            k, v = self.cache.update(pos, k, v, rows)  # (B, K, max_len, D)
            if mask is not None and mask.shape[-1] < k.shape[2]:  # attend only to the filled prefix
                k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]
        y = self.attend(q, k, v, mask)  # (B, H, T, D)
        return self.out(y.transpose(1, 2).reshape(B, T, H * D))  # (B, T, H * D) -> (B, T, dim)


# ---- MLPs ----------------------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul (ChatGLM2's dense_h_to_4h)."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(c.dim, 2 * c.ffn_dim, bias=c.bias)
        self.down = nn.Linear(c.ffn_dim, c.dim, bias=c.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gated(self.gate_up(x)))  # (B, T, 2 * ffn_dim) -> (B, T, ffn_dim) -> (B, T, dim)

    def gated(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of the fused projection (..., 2 * ffn_dim)."""
        gate, up = gate_up.chunk(2, dim=-1)  # each (..., ffn_dim)
        return F.silu(gate) * up


class GeluMLP(nn.Module):
    """down(gelu(up(x))) — GPT-2, BLOOM."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(c.dim, c.ffn_dim, bias=c.bias)
        self.down = nn.Linear(c.ffn_dim, c.dim, bias=c.bias)
        self.approximate = c.gelu_approx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate=self.approximate))


class LMHeadLoss(nn.Module):
    """The summed next-token cross-entropy of the LM head's logits (no weights): hidden (N, dim), the head's
    weight (vocab, dim), labels (N,) with IGNORE where nothing counts -> (sum, counted tokens), both tensors
    (no host sync). This plain form holds the (N, vocab) logits; `kernels` swaps in a blocked one."""

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(hidden, weight).float()  # (N, vocab)
        return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum"), (labels != IGNORE).sum()


class Block(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.attn_norm, self.attn = make_norm(c), Attention(c)
        self.mlp_norm, self.mlp = make_norm(c), (SwiGLU(c) if c.mlp == "swiglu" else GeluMLP(c))

    def forward(self, x, rope, mask, pos, rows=None):
        x = x + self.attn(self.attn_norm(x), rope, mask, pos, rows)
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
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.head_loss = LMHeadLoss()
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
        return self.norm.weight.device  # the norm: its weight stays a float tensor when linears are quantized

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

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
        """Slots per sequence of the KV cache set up (None: no cache)."""
        cache = self.layers[0].attn.cache if len(self.layers) else None
        return None if cache is None else cache.k.shape[2]

    @property
    def cache_batch(self) -> int | None:
        """Sequences the KV cache set up holds (None: no cache)."""
        cache = self.layers[0].attn.cache if len(self.layers) else None
        return None if cache is None else cache.k.shape[0]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache_rows: slice | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, vocab) for `input_ids` (B, T) — or, given `labels`, the training loss.

        positions: (T,) where these tokens sit in the sequence, and their KV-cache slots; default 0..T-1.
          Or (B, T), each row's own (rows of a KV cache that hold sequences of different lengths: a server's
          continuous batch); the default mask is then causal per row.
        mask: optional bool (B or 1, 1, T, S) — True where a query may attend to a key; default causal.
          With a cache, S is the number of filled slots (keys beyond are ignored).
        position_ids: optional (B, T) per-row positions for the position encoding (left-padded batches).
        cache_rows: optional slice, the KV-cache rows these B rows read and write (default the first B): a
          server prefills a new request into its own row while the other rows keep their sequences.
        logits_at: optional bool (B, T): compute the LM head only there and return (N, vocab) logits for
          the N selected positions — fine-tuning needs them at answer tokens only (saves the big matmul).
        labels: optional (B, T) next tokens (IGNORE = -100 where nothing counts): returns (summed
          cross-entropy, number of counted tokens) instead of logits, by `self.head_loss` (accelerated: without
          ever holding the (B, T, vocab) logits, the biggest tensors of a training step).
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
        last = None if torch.compiler.is_compiling() else int(positions[..., -1].max())  # the furthest slot
        if T > c.max_seq_len or (last is not None and last >= limit):
            raise ValueError(f"sequence of {last + 1} tokens exceeds the limit of {limit} "
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
            n = last + 1 if last is not None else self.cache_len
            mask = positions[..., None] >= torch.arange(n, device=self.device)  # (T, S) or (B, T, S)
            mask = mask[:, None] if mask.dim() == 3 else mask  # (T, S) or (B, 1, T, S)
        needs_float = c.position == "alibi" or c.sliding_window is not None
        if needs_float or (mask is not None and mask.dim() == 2):
            mask = self._mask(positions, mask, T, x.dtype)
        for block in self.layers:
            x = block(x, rope, mask, positions, cache_rows)
        x = self.norm(x)  # (B, T, dim)
        if logits_at is not None:
            logits_at = logits_at.to(x.device)
            x, labels = x[logits_at], (None if labels is None else labels.to(x.device)[logits_at])  # (N, dim)
        if labels is not None:
            return self.head_loss(x.reshape(-1, c.dim), self.lm_head.weight, labels.to(x.device).reshape(-1))
        return self.lm_head(x).float()  # (B, T, vocab) or (N, vocab): fp32 whatever the model's dtype

    def _mask(self, positions: torch.Tensor, mask: torch.Tensor | None, T: int, dtype) -> torch.Tensor:
        """Adds causality, the sliding window and ALiBi to `mask`; returns a (B|1, H|1, T, S) mask."""
        c = self.config
        if mask is None:
            mask = positions[..., None] >= torch.arange(T, device=self.device)  # (T, T) or (B, T, T) causal
        if mask.dim() < 4:
            mask = mask[None, None] if mask.dim() == 2 else mask[:, None]  # (1, 1, T, S) or (B, 1, T, S)
        S = mask.shape[-1]
        rel = torch.arange(S, device=self.device) - positions[..., None]  # (T, S): key - query, <= 0 visible
        rel = rel[:, None] if rel.dim() == 3 else rel  # per-row positions: (B, 1, T, S)
        if c.sliding_window is not None:
            mask = mask & (rel > -c.sliding_window)
        if c.position != "alibi":
            return mask
        bias = self.alibi.to(dtype)[:, None, None] * rel.to(dtype)  # (H, T, S) or (B, H, T, S)
        return bias.masked_fill(~mask, float("-inf"))  # (B|1, H, T, S)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            embeddings = [self.tok_emb] + ([self.pos_emb] if self.pos_emb is not None else [])
            n -= sum(p.numel() for e in embeddings for p in e.parameters())
        return n
