"""Weight-only quantization by module swap, as `lora` and `kernels` swap theirs: `quantize(model, "int8")`
replaces every `nn.Linear` by an `Int8Linear` (one int8 per weight, one scale per output row), and
`quantize(model, "int4", group_size=32)` by an `Int4Linear` (4 bits per weight, a scale and a minimum per
group of `group_size` inputs, in GGUF's Q4_1 layout), and `load_gguf_blocks(model, path)` keeps a GGUF
file's own Q8_0 / Q4_0 / Q4_1 blocks, with their fp16 scales (the file's size in memory). Activations stay in
the model's dtype. On CPU, up to 64 rows (decoding, short prompts; 8 a call) go through lmforge's own kernels
(`kernels/int8_gemv.cpp`, `kernels/int4_gemv.cpp`, loaded by these functions), which read the activations as
int16 blocks of 32 (1 part in 65534 of a block's largest value: `kernels/qx.h`) for integer products; longer
int8 prompts through torch's `_weight_int8pack_mm`; the rest through the weight unpacked for the product
(correct, not fast). On CUDA, int4 goes through torch's tensor-core int4 kernel (`_weight_int4pack_mm`,
"tinygemm", what gpt-fast and torchao's int4 weight-only use; bf16 activations, Ampere or newer), int8 as
gpt-fast writes it, `F.linear(x, q.to(x.dtype)) * scale`, which torch.compile fuses into one kernel reading
the int8 weight (torch's own CUDA `_weight_int8pack_mm` is a one-thread-per-output loop, not a fast path).

Norms (and an untied model's embedding) stay as they are. A tied model's LM head is quantized, and its
embedding then reads the same quantized table (`QuantEmbedding`): the weights are held once, at their
quantized size."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.kernels import build
from lmforge.kernels.cpu import on_huge_pages

SCHEMES = ("int8", "int4")
INT4_GROUPS = (32, 64, 128, 256)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KERNEL_ROWS = 8  # rows per call of lmforge's GEMV kernels (their row loops are compiled for 1 to 8)
# up to this many rows (a short prompt, a batch of decoding requests) go through the kernels 8 at a time: each call
# streams the packed weights once, which costs less than unpacking the whole matrix to floats for one product
CHUNKED_ROWS = 64


def _frozen(t: torch.Tensor) -> nn.Parameter:
    """A quantized module's tensor as a frozen parameter, not a buffer: torch.compile's guards skip checking that
    parameters do not alias each other (a check per buffer on every call of a compiled decode step)."""
    return nn.Parameter(t.contiguous(), requires_grad=False)


def _scales(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A module's block scales (and minimums) as the kernels take them, one dtype for all: fp16 where all are
    given so (a GGUF file's own: 2 bytes a block, not 4, on every decoded token), else fp32."""
    return ts if all(t.dtype == torch.float16 for t in ts) else tuple(t.float() for t in ts)


def _as_fp16(t: torch.Tensor) -> torch.Tensor:
    """`t` in fp16 where that holds every value exactly (a GGUF file's fp16 scales read as fp32), else as it is."""
    h = t.half()
    return h if torch.equal(h.float(), t.float()) else t


def _gemv(op, x: torch.Tensor, layer: nn.Module, *weights: torch.Tensor) -> torch.Tensor:
    """layer(x) through the kernel `op(*weights, rows)`, KERNEL_ROWS rows a call."""
    x2 = x.reshape(-1, x.shape[-1])  # (rows, in)
    parts = [op(*weights, x2[i:i + KERNEL_ROWS]) for i in range(0, x2.shape[0], KERNEL_ROWS)]
    return _out(parts[0] if len(parts) == 1 else torch.cat(parts), x, layer)


def _out(y: torch.Tensor, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """A product's rows y (rows, out) as layer(x) gives them: x's leading shape, plus the layer's bias."""
    y = y.view(*x.shape[:-1], layer.out_features)  # (..., out)
    return y if layer.bias is None else y + layer.bias.to(y.dtype)


class Int8Linear(nn.Module):
    """y = x @ (q * scale)ᵀ + b with q int8 (out, in) and one scale per group of G inputs of a row: scale is
    (out, in / G); G = in (one scale per row, symmetric: scale = max |w| / 127) from `from_float`, G = 32
    for GGUF's Q8_0 blocks. `kernel`: lmforge::int8_gemv is loaded (set by `quantize` / `load_gguf_blocks`)."""

    kernel = False

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.q = _frozen(q.to(torch.int8))  # (out, in)
        self.scale = _frozen(_scales(scale)[0].reshape(q.shape[0], -1))  # (out, in / G)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.out_features, self.in_features = q.shape

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # (out,)
        return cls(torch.round(w / scale[:, None]).clamp(-127, 127), scale, bias)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight these int8 values stand for (out, in), computed in `dtype`."""
        return self.rows(None, dtype)

    def rows(self, ids: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows `ids` (None: all) of the dequantized weight, (*ids.shape, in) in `dtype`: an embedding lookup in
        this table."""
        q, scale = (self.q, self.scale) if ids is None else (self.q[ids], self.scale[ids])
        groups = q.to(dtype).unflatten(-1, (self.scale.shape[1], -1))  # (..., in / G, G)
        return (groups * scale.to(dtype)[..., None]).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        cpu = x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES
        if cpu and self.kernel and 0 < rows <= CHUNKED_ROWS and (self.in_features // self.scale.shape[1]) % 32 == 0:
            return _gemv(torch.ops.lmforge.int8_gemv, x, self, self.q, self.scale)  # x read in int16 blocks of 32
        if cpu and self.scale.shape[1] == 1:  # one scale per row: torch's kernel
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, -1), self.q, self.scale[:, 0].to(x.dtype))
            return _out(y, x, self)
        if not cpu and self.scale.shape[1] == 1:  # CUDA (or a dtype the kernels do not take): gpt-fast's form
            return _out(F.linear(x, self.q.to(x.dtype)) * self.scale[:, 0].to(x.dtype), x, self)
        # the weight widened for the product: in x's dtype off the kernels' path, else in fp32 and rounded once
        w = self.dequantized(x.dtype) if not cpu else self.dequantized().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        group = self.in_features // self.scale.shape[1]
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8, "
                + ("a scale per row" if self.scale.shape[1] == 1 else f"a scale per {group} inputs"))


class Int4Linear(nn.Module):
    """y = x @ w'ᵀ + b with w' = q * scale + minimum for each block of 32 inputs of a row, q in [0, 15]: GGUF's
    Q4_1 (Q4_0's symmetric blocks are the case minimum = -8 * scale), held in its layout: 16 bytes a block,
    value j in the low nibble of byte j, value j + 16 in its high nibble. One to eight rows on CPU go through
    lmforge::int4_gemv when `kernel` (set by `quantize` / `load_gguf_blocks`); on a CUDA GPU of compute
    capability 8.0 or newer through torch's tinygemm kernel (`_tinygemm`: the same values, the scales and
    minimums rounded to bf16 for it, held beside the blocks: 2x the 4-bit bytes on the GPU); otherwise, or for
    more rows on CPU, through the weight unpacked for the product."""

    kernel = False
    tinygemm_weight: torch.Tensor | None
    tinygemm_scale_zero: torch.Tensor | None

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        out, k = q.shape
        if k % 32:
            raise ValueError(f"int4 weights come in blocks of 32 inputs; this layer has {k}")
        blocks = q.to(torch.uint8).view(out, k // 32, 32)  # (out, in / 32, 32)
        packed = blocks[..., :16] | (blocks[..., 16:] << 4)  # (out, in / 32, 16)
        self.packed = _frozen(packed.reshape(out, k // 2))  # (out, in / 2)
        scale, minimum = _scales(scale, minimum)
        self.scale = _frozen(scale.reshape(out, -1))  # (out, in / 32)
        self.minimum = _frozen(minimum.reshape(out, -1))  # (out, in / 32)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = k, out
        self.register_buffer("tinygemm_weight", None, persistent=False)
        self.register_buffer("tinygemm_scale_zero", None, persistent=False)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> Int4Linear:
        """Quantizes `weight` (out, in): each group's minimum and (max - min) / 15 as its scale (Q4_1); a group
        of 64 or more is held as blocks of 32 that share them."""
        w = weight.detach().float()
        groups = w.view(w.shape[0], -1, group_size)  # (out, G, group_size)
        lo, hi = groups.amin(-1), groups.amax(-1)  # (out, G)
        scale = ((hi - lo) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15).view_as(w)
        per_block = group_size // 32
        return cls(q, scale.repeat_interleave(per_block, 1), lo.repeat_interleave(per_block, 1), bias)

    def dequantized(self) -> torch.Tensor:
        """The weight these 4-bit values stand for, fp32 (out, in)."""
        return self.rows(None)

    def codes(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The 4-bit values q in [0, 15] of rows `ids` (default all), uint8 (..., in)."""
        p = (self.packed if ids is None else self.packed[ids]).unflatten(-1, (-1, 16))  # (..., in / 32, 16)
        return torch.cat((p & 0x0F, p >> 4), dim=-1).flatten(-2)

    def rows(self, ids: torch.Tensor | None) -> torch.Tensor:
        """Rows `ids` (None: all) of the dequantized weight, fp32 (*ids.shape, in): an embedding lookup in this
        table."""
        q = self.codes(ids).float().unflatten(-1, (-1, 32))  # (..., in / 32, 32)
        scale, minimum = (self.scale, self.minimum) if ids is None else (self.scale[ids], self.minimum[ids])
        return (q * scale[..., None] + minimum[..., None]).flatten(-2)

    def _apply(self, fn, recurse=True):
        """Moved or cast as any module; on a CUDA GPU that tinygemm runs on, its packed weight made anew."""
        self.tinygemm_weight = self.tinygemm_scale_zero = None
        super()._apply(fn, recurse)
        self._repack()
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._repack()  # new blocks: tinygemm's copy of them too

    def _repack(self) -> None:
        on_gpu = self.packed.is_cuda
        self.tinygemm_weight, self.tinygemm_scale_zero = _tinygemm(self) if on_gpu else (None, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if self.kernel and 0 < rows <= CHUNKED_ROWS and x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES:
            return _gemv(torch.ops.lmforge.int4_gemv, x, self, self.packed, self.scale, self.minimum)
        if self.tinygemm_weight is not None and x.is_cuda and rows > 0:
            y = torch.ops.aten._weight_int4pack_mm(x.reshape(rows, -1).to(torch.bfloat16).contiguous(),
                                                   self.tinygemm_weight, 32, self.tinygemm_scale_zero)
            return _out(y.to(x.dtype), x, self)
        return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 in blocks of 32"


def tinygemm_layout(module: Int4Linear) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`module`'s blocks as torch's int4 CUDA kernel takes them: the weight as uint8 (out, in / 2), byte j
    holding value 2j in its high nibble and 2j + 1 in its low one (`_convert_weight_to_int4pack` packs that
    into its tensor-core tiles); scale and zero per block, bf16 (in / 32, out, 2), its dequantisation being
    (q - 8) * scale + zero, so zero = minimum + 8 * scale; and the number of k-tiles of 16 packed together
    (8, 4 or 2: the most that divide the row)."""
    q = module.codes()  # (out, in)
    weight = (q[:, ::2] << 4 | q[:, 1::2]).contiguous()
    scale, minimum = module.scale.float(), module.minimum.float()
    scale_zero = torch.stack((scale, minimum + 8 * scale), dim=-1).transpose(0, 1)  # (in / 32, out, 2)
    inner = next(t for t in (8, 4, 2) if module.in_features % (16 * t) == 0)
    return weight, scale_zero.to(torch.bfloat16).contiguous(), inner


_TINYGEMM_WARNED: set[str] = set()


def _tinygemm(module: Int4Linear) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The tinygemm form of a CUDA `module` (`tinygemm_layout`, packed by torch), or (None, None) where the GPU
    or the shape does not take it (compute capability under 8.0, ROCm, rows not a multiple of 8). Checked once
    against the dequantized product on a random row: a kernel that disagrees (a torch whose layout moved) is
    not used, with a warning, and the layer keeps the dequantized product."""
    dev = module.packed.device
    if (torch.version.hip or module.out_features % 8 or torch.cuda.get_device_capability(dev) < (8, 0)
            or not hasattr(torch.ops.aten, "_weight_int4pack_mm")):
        return None, None
    weight, scale_zero, inner = tinygemm_layout(module)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack(weight, inner)
        x = torch.randn(1, module.in_features, device=dev, generator=torch.Generator(dev).manual_seed(0))
        x = x.to(torch.bfloat16)
        got = torch.ops.aten._weight_int4pack_mm(x, packed, 32, scale_zero).float()
    except RuntimeError as e:
        reason = f"raised {str(e).splitlines()[0]}"
    else:
        want = x.float() @ module.dequantized().T
        err = ((got - want).norm() / want.norm().clamp(min=1e-30)).item()
        if err < 0.02:  # bf16 activations, scales and output: ~0.3%; a wrong layout: ~100%
            return packed, scale_zero
        reason = f"is {err:.1%} off the dequantized product"
    if reason not in _TINYGEMM_WARNED:
        _TINYGEMM_WARNED.add(reason)
        warnings.warn(f"quantize: torch's int4 CUDA kernel {reason} (layer of {module.out_features} x "
                      f"{module.in_features}); int4 layers keep the dequantized product (correct, slower)",
                      stacklevel=3)
    return None, None


class QuantEmbedding(nn.Module):
    """The token embedding of a tied model read from the LM head's quantized table (the same buffers, held
    once): a lookup dequantizes only the rows it reads, in the model's `dtype`."""

    def __init__(self, table: Int8Linear | Int4Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.table, self.dtype = table, dtype
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(ids).to(self.dtype)  # (*ids.shape, dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, the LM head's quantized table"


def _share_tied_table(model: nn.Module) -> None:
    """A tied model whose LM head is now quantized reads its embeddings from that table: the float table
    (as big as every other weight of a small model together) is dropped."""
    head = getattr(model, "lm_head", None)
    if getattr(getattr(model, "config", None), "tie_embeddings", False) and isinstance(head, (Int8Linear, Int4Linear)):
        model.tok_emb = QuantEmbedding(head, model.tok_emb.weight.dtype)


def _on_huge_pages(model: nn.Module) -> None:
    """The quantized modules' CPU tensors onto 2 MiB pages (`kernels.cpu.on_huge_pages`): int8 products of
    SmolLM2's 30 layers and head on a 2-core EPYC (C), 4.5-5.4 ms a token on huge pages against 5.8-6.0 ms."""
    mods = [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    on_huge_pages([p for m in mods for p in ([m.q, m.scale] if isinstance(m, Int8Linear) else
                                             [m.packed, m.scale, m.minimum]) if p.device.type == "cpu"])


def _cpu_kernels(model: nn.Module, *names: str) -> list[bool]:
    """Whether each of the GEMV kernels `names` is loaded (built on first use) for `model`'s quantized linears;
    all False for a model on another device (a GPU's run torch's: no CPU build to wait for). First starts
    compiling the C++ decode step a CPU model will run (`kernels/step.py`) in another process, while this one
    builds the GEMV kernels: on first use ~20 s in all, not ~20 s each."""
    if not build.kernels_allowed() or all(p.device.type != "cpu" for p in model.parameters()):
        return [False] * len(names)
    build.prebuild(["decode_step"], wait=False)
    return [build.load(n) for n in names]


def quantize(model: nn.Module, scheme: str, group_size: int = 32) -> nn.Module:
    """Replaces every `nn.Linear` of `model` (in place; returned) by its int8 or int4 form, frozen. Refuses, by
    name, a scheme it does not know, a group size int4 does not take, and a layer whose inputs do not split
    into whole groups, before it changes anything."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantize: unknown scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear)]
    if scheme == "int4":
        if group_size not in INT4_GROUPS:
            raise ValueError(f"quantize: int4 group_size must be one of {INT4_GROUPS}, got {group_size}")
        for *_, child in targets:
            if child.in_features % group_size:
                raise ValueError(f"quantize: {_name(model, child)} has {child.in_features} inputs, not a "
                                 f"multiple of group_size {group_size}")
    kernel, = _cpu_kernels(model, f"{scheme}_gemv")
    for parent, name, child in targets:
        new = (Int8Linear.from_float(child.weight, child.bias) if scheme == "int8" else
               Int4Linear.from_float(child.weight, child.bias, group_size))
        if kernel:
            new.kernel = True
        setattr(parent, name, new.to(child.weight.device))
    _share_tied_table(model)
    _on_huge_pages(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _name(model: nn.Module, module: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is module), type(module).__name__)


def load_gguf_blocks(model: nn.Module, path) -> nn.Module:
    """Replaces each linear of `model` (loaded from the GGUF file `path`) whose weight is Q8_0, Q4_0 or Q4_1
    blocks in the file by an int8 / int4 module holding exactly those blocks' values and scales — nothing
    dequantized and quantized again (a tied LM head gets the embedding's blocks, and the embedding then reads
    them: `QuantEmbedding`). Matrices of other types (K-quants, F16...) stay float. In place; returned."""
    from lmforge.checkpoint.gguf import read_blocks
    from lmforge.checkpoint.hf import FAMILIES, hf_names, key_template

    config, blocks = read_blocks(path)
    family = FAMILIES[config["model_type"]]
    kernel, kernel4 = _cpu_kernels(model, "int8_gemv", "int4_gemv")
    for name, child in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        key = name + ".weight"
        if key_template(key)[0] in family.from_hf:  # a family transform the blocks would need: stays float
            continue
        sources = hf_names("tok_emb.weight" if name == "lm_head" and model.config.tie_embeddings else key, family)
        parts = [blocks.get(n) for n in sources]
        if any(p is None for p in parts) or len({p.kind for p in parts}) != 1:
            continue
        q = torch.cat([p.q for p in parts])  # (out, in): a fused projection's rows, part after part
        scale = _as_fp16(torch.cat([p.scale for p in parts]))  # (out, in / 32): the file's fp16 values
        if parts[0].kind == "Q8_0":
            new = Int8Linear(q, scale, child.bias)
            new.kernel = kernel
        else:
            new = Int4Linear(q, scale, _as_fp16(torch.cat([p.minimum for p in parts])), child.bias)
            new.kernel = kernel4
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], new.to(child.weight.device))
    _share_tied_table(model)
    _on_huge_pages(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
