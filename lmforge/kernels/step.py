"""A whole decode step in one C++ call (`decode_step.cpp`), for the models it covers: LLaMA-family blocks
(RMSNorm, RoPE, SwiGLU, MHA / GQA / MQA, biases or not, tied or not) on CPU, fp32, bf16 or fp16, their linears
float or `lmforge.quantize`'s int8 / int4 (a GGUF file's Q8_0 / Q4_0 / Q4_1 blocks). `generate` and the server
take it for every decode step of such a model (of one without quantized linears, or a bf16 / fp16 one: steps
of up to KERNEL_ROWS rows, `takes_rows`) and for short prompts (`takes_prompt`); any other
model, module (LoRA's wrappers, another attention, hooks) or device keeps the module path, eager or compiled.
A bf16 / fp16 model's step keeps its activations in fp32 (its weights and KV cache as they are, each new key
and value rounded once), as llama.cpp does; its module path rounds every activation to bf16, so the two agree
to bf16's precision. An fp32 model of float linears (what pretraining makes) took the module path until
session 15, when the C++ step had become the faster one there too (SmolLM2 f32 on the 2-core EPYC C, its
weights on 2 MiB pages, alternating rounds: 2 threads 84.2 tok/s against 74.7 for the compiled module step and
36.1 for the eager one, generate()'s default; 1 thread 52.4 / 43.3 / 32.5; the same greedy tokens).

Why a native step: with 4-bit weights the products of a SmolLM2-135M token take ~3.7 ms on 2 cores, and a
compiled torch graph adds ~2.5 ms of serial work around them (README: figures). It computes what the modules
compute, with the same kernels (the same integer block sums), its activations in fp32; the element-wise work differs
from torch's only in rounding (tests: logits against the model's forward, greedy tokens, the Paris answer)."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.kernels import build
from lmforge.kernels.cpu import gemv_dtypes, on_huge_pages
from lmforge.kernels.modules import (
    KERNEL_ROWS,
    BlasAttention,
    CpuLinear,
    FusedRMSNorm,
    FusedRoPE,
    FusedSwiGLU,
)
from lmforge.model import Attention, Block, RMSNorm, RoPE, SoftmaxAttention, SwiGLU, Transformer

_NORMS = (RMSNorm, FusedRMSNorm)
_ATTENDS = (SoftmaxAttention, BlasAttention)
_ROPES = (RoPE, FusedRoPE)
_MLPS = (SwiGLU, FusedSwiGLU)


PREFILL_ROWS = 64  # prompts of up to this many tokens (all rows together) are prefilled by the C++ step too
# ... of a model whose linears are all fp32: there its 8-row passes beat torch's products of the whole prompt
# only for short ones (SmolLM2 f32, 2 threads, C: 4 / 16 / 24 / 32 tokens 26 / 61 / 86 / 114 ms against 67 / 69
# / 88 / 98, prompt and first token)
FLOAT_PREFILL_ROWS = 16


class NativeStep:
    """The C++ step over a model's weights and KV cache (the cache's keys and values written as the forward
    writes them). `step(token (B, 1), pos)` decodes one token a row: pos (1,) the slot of every row, or (B, 1)
    each row's own (a server's continuous batch: row b sees its slots up to its own); key_valid (B, >= last
    slot + 1) False at pad slots, offsets (B, 1) left-pad counts. `prefill(ids (B, P), ...)` runs a short
    prompt. Both return the next-token logits (B, vocab), fp32."""

    def __init__(self, obj: torch.ScriptObject, half: bool = False, quantized: bool = True) -> None:
        self.obj = obj
        self.half = half  # a bf16 / fp16 model
        self.quantized = quantized  # some linear is int8 / int4

    def takes_rows(self, rows: int) -> bool:
        """Whether a decode step of `rows` rows should run here: any number for an fp32 model with quantized
        linears (their kernels take 8 rows a pass, as its modules do), up to KERNEL_ROWS for the others. With
        more, the modules use torch's products (oneDNN's native bf16 on CPUs with AVX512-BF16, MKL's for fp32),
        which read the weights once for all rows: SmolLM2 bf16 serving 16 clients on C, 229 tok/s that way
        against 207 through the C++ step's two 8-row passes (1 client: 63 against 29 tok/s for the uncompiled
        module step)."""
        return rows <= KERNEL_ROWS or self.quantized and not self.half

    def takes_prompt(self, tokens: int) -> bool:
        """Whether `prefill` should run a prompt of `tokens` tokens (all rows together): up to PREFILL_ROWS for an
        fp32 model with quantized linears, FLOAT_PREFILL_ROWS for one without, and KERNEL_ROWS (one pass of the
        weights) for a bf16 / fp16 model. Past that, torch's products of many rows - oneDNN's native bf16 on CPUs
        with AVX512-BF16, fp32 products of the converted weights on others - are faster: SmolLM2 bf16 on the
        2-core EPYC C, prompt and first token, 2 / 8 / 16 / 32 tokens: 18.6 / 32.7 / 61.2 / 90.4 ms through the
        step against 25.9 / 46.0 / 51.0 / 58.6."""
        return tokens <= (KERNEL_ROWS if self.half else PREFILL_ROWS if self.quantized else FLOAT_PREFILL_ROWS)

    def __call__(self, token: torch.Tensor, pos: torch.Tensor, key_valid: torch.Tensor | None = None,
                 offsets: torch.Tensor | None = None) -> torch.Tensor:
        off = None if offsets is None else offsets.reshape(-1)
        return self.obj.step(token.contiguous(), pos.reshape(-1), key_valid, off, None, 0)

    def prefill(self, ids: torch.Tensor, offsets: torch.Tensor | None = None, key_valid: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None, cache_rows: slice | None = None) -> torch.Tensor:
        """As `generate.prefill`: ids (B, P) from slot 0, left-padded (offsets (B, 1), key_valid (B, >= P)) or
        right-padded (lengths (B,): each row's logits at its last real token), into the cache rows `cache_rows`
        (default the first B)."""
        off = None if offsets is None else offsets.reshape(-1)
        last = None if lengths is None else (lengths.reshape(-1) - 1).to(torch.int64)
        first = torch.zeros(1, dtype=torch.int64)
        return self.obj.step(ids.contiguous(), first, key_valid, off, last, 0 if cache_rows is None else cache_rows.start)


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _cpu_float(*ts: torch.Tensor | None) -> bool:
    """Plain CPU float tensors (not an FSDP shard's DTensor, whose values the C++ step could not see whole)."""
    return all(t is None or (t.dtype in _FLOATS and t.device.type == "cpu"
                             and type(t.data if isinstance(t, nn.Parameter) else t) is torch.Tensor) for t in ts)


def _f32(t: torch.Tensor) -> torch.Tensor:
    """A norm weight, bias or RoPE table as the C++ step takes it: fp32 (a copy where the model is bf16 / fp16)."""
    return t.detach().float().contiguous()


def _linear(m: nn.Module) -> list[torch.Tensor] | None:
    """(weight, scale, minimum, bias) of a linear the C++ step takes, empty tensors where there is none; None
    when it takes no such module (another type, dtype or device: the module path, which names a mix-up)."""
    from lmforge.quantize import Int4Linear, Int8Linear

    none = torch.empty(0)
    b = getattr(m, "bias", None)
    if not _cpu_float(b):
        return None
    bias = none if b is None else _f32(b)
    scale = getattr(m, "scale", None)
    if scale is not None and scale.dtype not in (torch.float32, torch.float16):
        return None
    if type(m) is Int8Linear and m.q.device.type == "cpu" and (m.in_features // m.scale.shape[1]) % 32 == 0:
        return [m.q, m.scale, none, bias]
    if type(m) is Int4Linear and m.packed.device.type == "cpu":
        return [m.packed, m.scale, m.minimum, bias]
    if type(m) in (nn.Linear, CpuLinear) and _cpu_float(m.weight):
        return [m.weight.detach().contiguous(), none, none, bias]
    return None


def _hooked(model: nn.Module) -> bool:
    """Whether running `model` must call its modules' forwards: forward hooks or pre-hooks (global, or on any
    module), or a forward replaced on the instance (a wrapper, a test's stand-in)."""
    from torch.nn.modules import module as torch_module

    return ("forward" in vars(model) or bool(torch_module._global_forward_hooks)
            or bool(torch_module._global_forward_pre_hooks)
            or any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()))


def _tensors(model: Transformer) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]] | None:
    """The tensors the C++ step takes from `model`, in its order, and each linear's (head first, then the
    layers'); None where a module is of a type or dtype it does not take."""
    from lmforge.quantize import QuantEmbedding

    emb = model.tok_emb
    if type(emb) is QuantEmbedding and emb.table is model.lm_head:
        table = torch.empty(0)
    elif type(emb) is nn.Embedding and _cpu_float(emb.weight):
        table = emb.weight.detach().contiguous()
    else:
        return None
    head = _linear(model.lm_head)
    if head is None:
        return None
    if not _cpu_float(model.rope_cos, model.rope_sin):
        return None
    slots = model.layers[0].attn.cache.k.shape[2]  # positions never pass the cache's length
    tensors = [table, _f32(model.rope_cos[:slots]), _f32(model.rope_sin[:slots]), _f32(model.norm.weight), *head]
    linears = [head]
    for b in model.layers:
        a, mlp = b.attn, b.mlp
        if (type(b) is not Block or type(a) is not Attention or type(a.attend) not in _ATTENDS
                or type(a.rope) not in _ROPES or type(mlp) not in _MLPS):
            return None
        layer = [_linear(m) for m in (a.qkv, a.out, mlp.gate_up, mlp.down)]
        if any(t is None for t in layer):
            return None
        linears += layer
        tensors += [_f32(b.attn_norm.weight), _f32(b.mlp_norm.weight), *(t for lin in layer for t in lin),
                    a.cache.k, a.cache.v]
    return tensors, linears


def _float_weights(model: Transformer) -> list[nn.Parameter]:
    """The float (not quantized) linears' weights a decode step reads in full: the LM head's and the layers'."""
    mods = [model.lm_head] + [m for b in model.layers for m in (b.attn.qkv, b.attn.out, b.mlp.gate_up, b.mlp.down)]
    return [m.weight for m in mods if type(m) in (nn.Linear, CpuLinear)]


def native_step(model: nn.Module, batch: int) -> NativeStep | None:
    """The C++ decode step for `model` (its KV cache set up for at least `batch` rows), or None where it does not
    apply: kernels off (LMFORGE_CPU_KERNELS=0) or not buildable, not a CPU model, an architecture or module
    it does not cover, or forward hooks that expect the modules to run. It runs no autograd: for inference (generate runs under inference_mode)."""
    if not isinstance(model, Transformer) or not build.kernels_allowed() or _hooked(model):
        return None
    c = model.config
    if (model.device.type != "cpu" or model.dtype not in _FLOATS or c.norm != "rmsnorm" or c.mlp != "swiglu"
            or c.position != "rope" or c.sliding_window is not None or c.embed_norm or c.head_dim % 8
            or c.rope_dim % 2 or not len(model.layers)):
        return None
    caches = [b.attn.cache for b in model.layers]
    if any(k is None for k in caches) or caches[0].k.shape[0] < batch or caches[0].k.dtype not in _FLOATS:
        return None
    norms = [model.norm] + [n for b in model.layers for n in (b.attn_norm, b.mlp_norm)]
    if any(type(n) not in _NORMS or n.eps != c.norm_eps or not _cpu_float(n.weight) for n in norms):
        return None
    found = _tensors(model)
    if found is None:
        return None
    tensors, linears = found
    if model.dtype != torch.float32 and model.dtype not in gemv_dtypes():
        return None  # a CPU with AMX: its half products stay oneDNN's (kernels.cpu.gemv_dtypes)
    if not build.load("decode_step"):
        return None
    if on_huge_pages(_float_weights(model)):  # once (kernels.cpu.on_huge_pages)
        tensors = _tensors(model)[0]  # the moved weights
    ints = [c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.rope_dim, int(c.rope_interleaved), c.n_layers]
    return NativeStep(torch.classes.lmforge.DecodeStep(tensors, ints, float(c.norm_eps)), model.dtype != torch.float32,
                      any(lin[1].numel() for lin in linears))
