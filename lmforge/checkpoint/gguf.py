"""Read a llama- or qwen2-architecture GGUF file (llama.cpp's format) as what a Hugging Face folder holds, and
write one from an lmforge model and tokenizer (`write_gguf`).

A GGUF keeps the config and the tokenizer as metadata and the weights as (often quantized) blocks.
Parsing and dequantizing are the `gguf` package's (`GGUFReader`, `gguf.quants.dequantize`); this file
adds the checks that name the file, the GGUF→HF name table, the undoing of llama.cpp's Q/K row order,
and the tokenizer rebuilt with `tokenizers`. Nothing is unpickled: GGUF holds no Python objects.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFReader,
    GGUFWriter,
    LlamaFileType,
    ReaderField,
    ReaderTensor,
)
from gguf.quants import dequantize, quant_shape_to_byte_shape, quantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from lmforge.checkpoint.atomic import atomic_file
from lmforge.checkpoint.errors import CheckpointError

_MAGIC = b"GGUF"
_HEADER_BYTES = 24  # magic (4), version (u32), tensor count (u64), metadata count (u64)
_MAX_DIMS = 4  # GGML_MAX_DIMS

# GGUF tensor name -> HF llama name ({i}: layer index), as llama.cpp's convert_hf_to_gguf.py writes them.
_LLAMA_FROM_GGUF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

_QKV_BIAS_FROM_GGUF = {  # qwen2's
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
}
# general.architecture -> the transformers class. llama.cpp runs llama with interleaved RoPE pairs, so its
# converter reorders llama's Q/K rows; qwen2 runs with half-split pairs (NEOX), so its rows stay as HF has them.
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# `tokenizer.ggml.pre` -> how llama.cpp splits text before byte-level BPE (llama-vocab.cpp), as
# `tokenizers` pieces: `split` is a regex applied first, `digits` puts every digit in its own piece
# (llama.cpp's leading "\p{N}" rule), neither means GPT-2's regex. `ignore_merges`: a piece that is
# already a vocabulary token is taken whole (llama.cpp does this for the llama-3 family).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_GPT2: dict[str, Any] = {}
_STARCODER = {"digits": True}
_LLAMA3 = {"split": _LLAMA3_SPLIT, "ignore_merges": True}
_PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    **dict.fromkeys(("default", "gpt2", "mpt", "olmo"), _GPT2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"),
                    _STARCODER),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe", "falcon3"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), {"split": _QWEN2_SPLIT}),
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values that mark added tokens

_REQUIRED = object()


@dataclass
class GGUFContents:
    """What a Hugging Face llama folder would hold, read from one GGUF file."""

    hf_config: dict[str, Any]  # config.json
    tensors: dict[str, torch.Tensor]  # HF names; no lm_head.weight when the file ties it to the embedding
    tokenizer: Tokenizer  # tokenizer.json
    tokenizer_config: dict[str, Any]  # tokenizer_config.json


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> GGUFContents:
    """Read a llama or qwen2 GGUF file: config, dequantized HF-named tensors in `dtype`, tokenizer.

    Every problem with the file is a `CheckpointError` that names it (and the tensor or key)."""
    if not dtype.is_floating_point:
        raise ValueError(f"read_gguf: dtype must be a floating point type, got {dtype}")
    path = Path(path)
    _check_header(path)
    try:
        reader = _CheckedReader(path)
        if reader.byte_order != "I":
            raise CheckpointError(f"{path}: GGUF in the other byte order (big-endian?) is not supported")
        meta = _Metadata(reader, path)
        hf_config = _hf_config(meta)
        tokenizer, tokenizer_config = _tokenizer(meta)
        tensors = _tensors(reader, hf_config, path, dtype)
    except (CheckpointError, OSError, MemoryError):
        raise
    except Exception as e:  # GGUFReader fails on bad bytes with ValueError, IndexError, KeyError, ...
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    return GGUFContents(hf_config, tensors, tokenizer, tokenizer_config)


# ---- the file: header and tensor entries -------------------------------------------------------------------


def _check_header(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if head[:4] != _MAGIC:
        hint = " (a zip/torch.save file)" if head[:2] == b"PK" else ""
        raise CheckpointError(f"{path}: not a GGUF file: starts with {head[:4]!r}{hint}, expected {_MAGIC!r}")
    if len(head) < _HEADER_BYTES:
        raise CheckpointError(f"{path}: truncated GGUF: {len(head)} bytes, shorter than the header")


class _CheckedReader(GGUFReader):
    """`GGUFReader` that checks every tensor entry (dims, type, byte range) before mapping its data.

    GGUFReader maps all tensors in its constructor and, on a bad entry, fails with numpy's "cannot
    reshape array…", which names neither file nor tensor; `_build_tensors` is the step that maps them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(path)

    def _build_tensors(self, start_offs: int, fields: list[ReaderField]) -> None:
        for field in fields:
            _, name, _, dims, raw_type, offset = field.parts
            self._check_entry(bytes(name).decode("utf-8", "replace"), dims.tolist(), int(raw_type[0]),
                              start_offs + int(offset[0]))
        super()._build_tensors(start_offs, fields)

    def _check_entry(self, name: str, dims: list[int], raw_type: int, start: int) -> None:
        where = f"{self.path}: tensor {name!r}"
        if not 1 <= len(dims) <= _MAX_DIMS or 0 in dims:
            raise CheckpointError(f"{where}: impossible dimensions {dims}")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
        except (ValueError, KeyError):
            raise CheckpointError(f"{where}: unknown ggml type {raw_type}") from None
        if dims[0] % block:
            raise CheckpointError(f"{where}: row length {dims[0]} is not a multiple of the type's block size "
                                  f"{block}")
        end = start + math.prod(dims) // block * type_size
        if end > len(self.data):
            raise CheckpointError(f"{where}: data at bytes {start}..{end} runs past the end of the file "
                                  f"({len(self.data)} bytes); truncated or corrupt")


class _Metadata:
    """Typed access to GGUF metadata; a missing or mistyped key is a `CheckpointError` naming it."""

    def __init__(self, reader: GGUFReader, path: Path) -> None:
        self.reader, self.path = reader, path

    def get(self, key: str, kind: type, default: Any = _REQUIRED) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise CheckpointError(f"{self.path}: missing required metadata key {key!r}")
            return default
        value = field.contents()
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CheckpointError(f"{self.path}: metadata {key!r} should be of type {kind.__name__}, "
                                  f"got {value!r:.80}")
        return value

    def positive(self, key: str, default: Any = _REQUIRED) -> int:
        value = self.get(key, int, default)
        if value <= 0:
            raise CheckpointError(f"{self.path}: metadata {key!r} must be positive, got {value}")
        return value


# ---- config ------------------------------------------------------------------------------------------------


def _hf_config(meta: _Metadata) -> dict[str, Any]:
    """The HF config dict (`LlamaConfig` or `Qwen2Config`) the `llama.*` / `qwen2.*` metadata describes."""
    arch = meta.get("general.architecture", str)
    if arch not in _ARCHITECTURES:
        raise CheckpointError(f"{meta.path}: architecture {arch!r} is not supported; only "
                              f"{' and '.join(map(repr, _ARCHITECTURES))} are")
    if meta.get(f"{arch}.expert_count", int, 0):
        raise CheckpointError(f"{meta.path}: mixture-of-experts {arch} ({arch}.expert_count) is not supported")
    hidden, n_heads = meta.positive(f"{arch}.embedding_length"), meta.positive(f"{arch}.attention.head_count")
    n_kv_heads = meta.positive(f"{arch}.attention.head_count_kv", n_heads)
    head_dim = meta.positive(f"{arch}.attention.key_length", hidden // n_heads or 1)
    rope_dims = meta.get(f"{arch}.rope.dimension_count", int, head_dim)
    if n_heads % n_kv_heads or head_dim % 2 or rope_dims != head_dim:
        raise CheckpointError(f"{meta.path}: unsupported attention shape: {n_heads} heads, {n_kv_heads} kv "
                              f"heads, head_dim {head_dim}, RoPE over {rope_dims} of its dims")
    tokens = meta.get("tokenizer.ggml.tokens", list)
    config = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": meta.positive(f"{arch}.vocab_size", len(tokens) or 1),
        "hidden_size": hidden,
        "intermediate_size": meta.positive(f"{arch}.feed_forward_length"),
        "num_hidden_layers": meta.positive(f"{arch}.block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": meta.get(f"{arch}.attention.layer_norm_rms_epsilon", float),
        "rope_theta": meta.get(f"{arch}.rope.freq_base", float, 10000.0),
        "max_position_embeddings": meta.positive(f"{arch}.context_length"),
        "tie_word_embeddings": "output.weight" not in {t.name for t in meta.reader.tensors},
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id", int, None),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id", int, None),
        "hidden_act": "silu",
        "attention_bias": arch == "qwen2",
        "mlp_bias": False,
    }
    scaling = meta.get(f"{arch}.rope.scaling.type", str, "none")
    if scaling == "linear":
        factor = meta.get(f"{arch}.rope.scaling.factor", float)
        config["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    elif scaling != "none":
        raise CheckpointError(f"{meta.path}: rope scaling {scaling!r} is not supported (only none, linear)")
    return config


def _expected(c: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every GGUF tensor name this config implies -> (HF name, HF shape (out_features, in_features))."""
    h, v, ffn = c["hidden_size"], c["vocab_size"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    shapes = dict(zip(_LLAMA_FROM_GGUF, [(v, h), (h,), (v, h), (h,), (q, h), (kv, h), (kv, h), (h, q), (h,),
                                         (ffn, h), (ffn, h), (h, ffn)]))
    names = dict(_LLAMA_FROM_GGUF)
    if c["attention_bias"]:  # qwen2
        names |= _QKV_BIAS_FROM_GGUF
        shapes |= dict(zip(_QKV_BIAS_FROM_GGUF, [(q,), (kv,), (kv,)]))
    return {g.format(i=i): (hf.format(i=i), shapes[g]) for g, hf in names.items()
            for i in (range(c["num_hidden_layers"]) if "{i}" in g else [0])}


# ---- tensors -----------------------------------------------------------------------------------------------


def _tensors(
    reader: GGUFReader, config: dict[str, Any], path: Path, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Check names and shapes of all tensors against the config, then dequantize them into HF layout."""
    expected = _expected(config)
    for t in reader.tensors:
        if t.name not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r}: not part of a {config['model_type']} model with "
                                  f"{config['num_hidden_layers']} layers (rope_freqs, MoE are not supported)")
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists the row length (ne0) first
        hf, want = expected[t.name]
        if shape != want:
            raise CheckpointError(f"{path}: tensor {t.name!r} has shape {shape}, but the metadata implies "
                                  f"{want} for {hf}")
    names = {t.name for t in reader.tensors}
    missing = [g for g in expected if g not in names and g != "output.weight"]  # no output.weight: tied
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    tensors = {expected[t.name][0]: _dequantize(t, path, dtype) for t in reader.tensors}
    for i in range(config["num_hidden_layers"] if config["model_type"] == "llama" else 0):  # qwen2: HF's order
        q, k = f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.self_attn.k_proj.weight"
        tensors[q] = _unpermute_rope(tensors[q], config["num_attention_heads"])
        tensors[k] = _unpermute_rope(tensors[k], config["num_key_value_heads"])
    return tensors


def _dequantize(t: ReaderTensor, path: Path, dtype: torch.dtype) -> torch.Tensor:
    """One tensor as a `dtype` torch tensor of shape (out_features, in_features) (or (n,) for norms)."""
    try:
        values = dequantize(t.data, t.tensor_type)  # float32, rows = the GGUF's leading dims
    except NotImplementedError:
        raise CheckpointError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, "
                              "which gguf.quants cannot dequantize") from None
    shape = tuple(int(d) for d in reversed(t.shape))  # (out_features, in_features)
    return torch.tensor(np.asarray(values).reshape(shape), dtype=dtype)


def _unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order. Its converter reorders each head's rows from HF's half-split RoPE
    layout (x_0..x_{d/2-1}, y_0..y_{d/2-1}) to interleaved pairs (x_0, y_0, x_1, y_1, ...)."""
    out_features, in_features = w.shape
    w = w.reshape(n_heads, out_features // n_heads // 2, 2, in_features)  # (heads, head_dim/2, pair, in)
    return w.transpose(1, 2).reshape(out_features, in_features)  # (heads, pair, head_dim/2, in) -> (out, in)


# ---- quantized blocks, kept as they are ---------------------------------------------------------------------


@dataclass
class Blocks:
    """A GGUF matrix's quantized values as they are in the file, laid out (out_features, in_features) in HF's
    row order: value = q * scale + minimum for each block of 32 inputs of a row. Q8_0: q int8 in [-128, 127],
    no minimum (None); Q4_0: q in [0, 15], minimum = -8 * scale; Q4_1: q in [0, 15], its own minimum."""

    kind: str  # "Q8_0", "Q4_0" or "Q4_1"
    q: torch.Tensor  # (out, in) int8 (Q8_0) or uint8 (Q4_*)
    scale: torch.Tensor  # (out, in / 32) float32, the file's fp16 values
    minimum: torch.Tensor | None  # (out, in / 32) float32, or None (Q8_0)


_BLOCK_KINDS = {GGMLQuantizationType.Q8_0: "Q8_0", GGMLQuantizationType.Q4_0: "Q4_0",
                GGMLQuantizationType.Q4_1: "Q4_1"}


def read_blocks(path: str | Path) -> tuple[dict[str, Any], dict[str, Blocks]]:
    """(config.json of the file, its Q8_0 / Q4_0 / Q4_1 matrices as `Blocks` under HF names), nothing
    dequantized: llama's Q/K rows are put back in HF's order, block by block."""
    path = Path(path)
    _check_header(path)
    try:
        reader = _CheckedReader(path)
        config = _hf_config(_Metadata(reader, path))
        expected = _expected(config)
        out = {}
        for t in reader.tensors:
            if t.tensor_type in _BLOCK_KINDS and len(t.shape) == 2 and t.name in expected:
                out[expected[t.name][0]] = _blocks(t)
    except (CheckpointError, OSError, MemoryError):
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    if config["model_type"] == "llama":
        for i in range(config["num_hidden_layers"]):
            for name, heads in (("q_proj", "num_attention_heads"), ("k_proj", "num_key_value_heads")):
                b = out.get(f"model.layers.{i}.self_attn.{name}.weight")
                if b is not None:
                    for part in ("q", "scale", "minimum"):
                        if getattr(b, part) is not None:
                            setattr(b, part, _unpermute_rope(getattr(b, part), config[heads]))
    return config, out


def _blocks(t: ReaderTensor) -> Blocks:
    """The values of one Q8_0 / Q4_0 / Q4_1 tensor (GGUF rows of raw bytes), decoded without arithmetic."""
    kind = _BLOCK_KINDS[t.tensor_type]
    rows = int(t.shape[1])
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind]  # bytes per block of 32: fp16 scale (+ fp16 min) + values
    raw = np.ascontiguousarray(t.data).reshape(rows, -1, size)  # (out, in / 32, block bytes)
    scale = torch.from_numpy(raw[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))  # (out, in / 32)
    if kind == "Q8_0":
        q = raw[..., 2:].copy().view(np.int8)  # (out, in / 32, 32)
        return Blocks(kind, torch.from_numpy(q.reshape(rows, -1)), scale, None)
    start = 4 if kind == "Q4_1" else 2
    packed = raw[..., start:start + 16]  # value j in the low nibble of byte j, value j + 16 in its high nibble
    q = np.concatenate((packed & 0x0F, packed >> 4), axis=-1)  # (out, in / 32, 32)
    minimum = (torch.from_numpy(raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)) if kind == "Q4_1"
               else -8 * scale)
    return Blocks(kind, torch.from_numpy(q.reshape(rows, -1)), scale, minimum)


# ---- tokenizer ---------------------------------------------------------------------------------------------


def _tokenizer(meta: _Metadata) -> tuple[Tokenizer, dict[str, Any]]:
    """The byte-level BPE tokenizer described by `tokenizer.ggml.*`, and its tokenizer_config.json dict."""
    kind = meta.get("tokenizer.ggml.model", str)
    if kind not in ("gpt2", "llama"):
        raise CheckpointError(f"{meta.path}: tokenizer model {kind!r} is not supported; 'gpt2' (byte-level BPE) "
                              "and 'llama' (SentencePiece BPE) are")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens", list)
    types: list[int] = meta.get("tokenizer.ggml.token_type", list, [])
    if kind == "llama":
        scores = meta.get("tokenizer.ggml.scores", list)
        if len(scores) != len(tokens):
            raise CheckpointError(f"{meta.path}: tokenizer.ggml.scores has {len(scores)} entries for "
                                  f"{len(tokens)} tokens")
        tokenizer = _sentencepiece_backend(tokens, scores, types,
                                           meta.get("tokenizer.ggml.add_space_prefix", bool, True))
    else:
        pre = meta.get("tokenizer.ggml.pre", str, "default")
        if pre not in _PRE_TOKENIZERS:
            raise CheckpointError(f"{meta.path}: tokenizer.ggml.pre {pre!r} is not supported; "
                                  f"supported: {', '.join(sorted(_PRE_TOKENIZERS))}")
        tokenizer = _backend(tokens, meta.get("tokenizer.ggml.merges", list), types, pre)

    config: dict[str, Any] = {}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}", int, None)
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise CheckpointError(f"{meta.path}: tokenizer.ggml.{key} {token_id} is outside the vocabulary "
                                  f"of {len(tokens)} tokens")
        config[f"{name}_token"] = None if token_id is None else tokens[token_id]
    config["add_bos_token"] = meta.get("tokenizer.ggml.add_bos_token", bool, False)
    config["add_eos_token"] = meta.get("tokenizer.ggml.add_eos_token", bool, False)
    template = meta.get("tokenizer.chat_template", str, None)
    if template is not None:
        config["chat_template"] = template
    tokenizer.post_processor = _post_processor(config, tokenizer)
    return tokenizer, config


def _backend(tokens: list[str], merges: list[str], types: list[int], pre: str) -> Tokenizer:
    """The `tokenizers` byte-level BPE that llama.cpp's reading of these `tokenizer.ggml.*` values amounts to."""
    style = _PRE_TOKENIZERS[pre]
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tokenizer = Tokenizer(models.BPE(vocab, pairs, ignore_merges=style.get("ignore_merges", False)))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if style.get("digits") else []
    if "split" in style:
        steps.append(pre_tokenizers.Split(Regex(style["split"]), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex="split" not in style))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    return _add_tokens(tokenizer, tokens, types)


def _sentencepiece_backend(tokens: list[str], scores: list[float], types: list[int],
                           add_space_prefix: bool) -> Tokenizer:
    """llama.cpp's 'llama' vocabulary (LLaMA 1/2, Mistral, TinyLlama…) as a `tokenizers` BPE. As llama.cpp
    tokenizes: spaces become "\u2581", and with add_space_prefix one more goes before each stretch of text (at
    the start, and after a special token); characters missing from the vocabulary fall back to <0xNN> byte
    tokens (or the unknown token); pieces merge best-score first (the merges are read off the vocabulary: a
    piece is the merge of two shorter pieces, ranked by its score)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores):
        found = sorted(((piece[:k], piece[k:]) for k in range(1, len(piece))
                        if piece[:k] in vocab and piece[k:] in vocab), key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges += [(left, right, score) for left, right in found]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # stable: ties keep vocabulary order
    unk = next((t for t, k in zip(tokens, types) if k == _UNKNOWN), None)
    tokenizer = Tokenizer(models.BPE(vocab, [(a, b) for a, b, _ in merges], unk_token=unk, fuse_unk=True,
                                     byte_fallback=True))
    # a normalizer, not Metaspace: it sees each stretch of text between added tokens, so each gets its space
    spaces = normalizers.Replace(" ", "\u2581")
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), spaces]) if add_space_prefix \
        else spaces
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return _add_tokens(tokenizer, tokens, types)


def _add_tokens(tokenizer: Tokenizer, tokens: list[str], types: list[int]) -> Tokenizer:
    """Control tokens (<|im_start|>, <s>…), the unknown token and user-defined ones are matched whole in raw
    text, as llama.cpp does."""
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, k in zip(tokens, types) if k in (_CONTROL, _UNKNOWN)])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, k in zip(tokens, types) if k == _USER_DEFINED])
    return tokenizer


def _post_processor(config: dict[str, Any], tokenizer: Tokenizer) -> processors.PostProcessor | None:
    """Add bos/eos around each sequence where the file asks for it (`add_special_tokens=True` in encode)."""
    head = [config["bos_token"]] if config["add_bos_token"] and config["bos_token"] else []
    tail = [config["eos_token"]] if config["add_eos_token"] and config["eos_token"] else []
    if not head + tail:
        return None
    pair = [*head, "$A", *tail, *(f"{t}:1" for t in head), "$B:1", *(f"{t}:1" for t in tail)]
    specials = {t: tokenizer.token_to_id(t) for t in head + tail}
    return processors.TemplateProcessing(single=[*head, "$A", *tail], pair=pair,
                                         special_tokens=list(specials.items()))


# ---- writing -----------------------------------------------------------------------------------------------

# outtype -> (ggml type of the matrices, general.file_type), the choices of llama.cpp's convert_hf_to_gguf.py
OUTTYPES = {"f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
            "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
            "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
            "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
            "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
            "q4_1": (GGMLQuantizationType.Q4_1, LlamaFileType.MOSTLY_Q4_1)}
# in a 4-bit file the token embedding and the LM head stay 8-bit (Q8_0): the logits are the most sensitive
# product (llama.cpp's llama-quantize keeps the output tensor at a higher type too)
_HEAD_TYPE = GGMLQuantizationType.Q8_0
_NORMAL, _UNKNOWN, _UNUSED, _BYTE = 1, 2, 5, 6
_GGUF_FROM_LLAMA = {hf: g for g, hf in (_LLAMA_FROM_GGUF | _QKV_BIAS_FROM_GGUF).items()}
# one `tokenizer.ggml.pre` per distinct way of splitting text in _PRE_TOKENIZERS, tried in this order
_PRE_CANDIDATES = ("gpt2", "smollm", "llama-bpe", "qwen2")
_PROBES = [  # texts on which the splitting styles differ: digit runs, contractions, letters after symbols, spaces
    "Hello world! It's 2024-01-31; they'll pay $1234567.89 for 3 apples.\r\n\n  ok",
    "def add(a, b):\n    return a + b  # sum\n\n\tprint(add(1, 2))   ",
    "I'VE SEEN 42x42 (x²=y) ... 'quoted' don't DON'T ,,,word!!!tail",
    "你好，世界！今天天气很好。12月31日 ١٢٣ emoji: 🤗🙂👍🏽",
    "a\u00a0b\u2003c  \n\n\n   d\t\te",
]


def write_gguf(model, tokenizer, path: str | Path, outtype: str = "f16", name: str | None = None) -> Path:
    """Write `model` (an lmforge Transformer of the llama or qwen2 architecture) and its `tokenizer` (byte-level
    BPE, or SentencePiece-style BPE) as one GGUF file that llama.cpp runs, as llama.cpp's own converter lays it
    out: llama.* / qwen2.* metadata, the vocabulary with merges or scores, token types, special ids and chat
    template, llama's Q/K rows in llama.cpp's interleaved order, norms and biases in F32 and the matrices in
    `outtype` (f32, f16, bf16, q8_0, q4_0, q4_1; a matrix whose rows do not split into 32-value blocks stays f16, and
    the embedding and LM head of a 4-bit file are q8_0). Atomic: the file appears complete or not at all."""
    from lmforge.checkpoint.hf import to_hf
    from lmforge.config import hf_model_type

    if outtype not in OUTTYPES:
        raise ValueError(f"GGUF outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    c = model.config
    family = hf_model_type(c)
    if family not in _ARCHITECTURES:
        raise ValueError(f"GGUF export writes llama- and qwen2-architecture files (RMSNorm, full half-split RoPE, "
                         f"SwiGLU, no biases but qwen2's on Q/K/V, no sliding window); this model is {family!r}")
    if tokenizer is None:
        raise ValueError("a GGUF file holds the tokenizer too: this model has none")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; the GGUF destination is a file")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"{path}: {path.parent} is a file, not a folder")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("the model has no weights (it is on the meta device): load or train it first")
    vocab = _vocabulary(tokenizer, c.vocab_size)
    qtype, file_type = OUTTYPES[outtype]
    permute = family == "llama"
    state = to_hf({k: v.detach() for k, v in model.state_dict().items()}, family, c)  # views, any dtype

    with atomic_file(path) as tmp:
        w = GGUFWriter(str(tmp), family)
        w.add_type("model")
        w.add_name(name or path.stem)
        w.add_file_type(file_type)
        w.add_quantization_version(GGML_QUANT_VERSION)
        w.add_vocab_size(c.vocab_size)
        w.add_context_length(c.max_seq_len)
        w.add_embedding_length(c.dim)
        w.add_block_count(c.n_layers)
        w.add_feed_forward_length(c.ffn_dim)
        w.add_head_count(c.n_heads)
        w.add_head_count_kv(c.n_kv_heads)
        if c.head_dim * c.n_heads != c.dim:
            w.add_key_length(c.head_dim)
            w.add_value_length(c.head_dim)
        w.add_rope_dimension_count(c.head_dim)
        w.add_rope_freq_base(c.rope_theta)
        w.add_layer_norm_rms_eps(c.norm_eps)
        w.add_tokenizer_model(vocab["model"])
        w.add_tokenizer_pre(vocab["pre"])
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["token_type"])
        if "merges" in vocab:
            w.add_token_merges(vocab["merges"])
        else:
            w.add_token_scores(vocab["scores"])
        for key, token_id in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id),
                              ("unk", tokenizer.unk_id if tokenizer.unk_token else None),
                              ("pad", tokenizer.pad_id if tokenizer.pad_token else None)):
            if token_id is not None:
                getattr(w, f"add_{key}_token_id")(token_id)
        w.add_add_bos_token(bool(tokenizer.add_bos))
        w.add_add_eos_token(False)
        w.add_add_space_prefix(vocab["add_space_prefix"])
        if tokenizer.chat_template:
            w.add_chat_template(tokenizer.chat_template)
        # tensor entries first, then each tensor converted and written in turn: one fp32 copy at a time in memory
        plan = []
        for hf_name, t in state.items():
            g = _gguf_name(hf_name)
            head = g in ("token_embd.weight", "output.weight") and outtype.startswith("q4")
            plan.append((hf_name, g, _gguf_kind(t.shape, _HEAD_TYPE if head else qtype)))
        for hf_name, g, kind in plan:
            shape = tuple(state[hf_name].shape)
            if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                dtype = np.float32 if kind == GGMLQuantizationType.F32 else np.float16
                w.add_tensor_info(g, shape, np.dtype(dtype), math.prod(shape) * np.dtype(dtype).itemsize)
            else:
                raw = quant_shape_to_byte_shape(shape, kind)
                w.add_tensor_info(g, raw, np.dtype(np.uint8), math.prod(raw), raw_dtype=kind)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for hf_name, g, kind in plan:
            w.write_tensor_data(_gguf_data(state[hf_name], g, kind, c, permute))
        w.close()
    return path


def _gguf_name(hf_name: str) -> str:
    """llama.cpp's name of an HF-named tensor."""
    layer = re.search(r"\.(\d+)\.", hf_name)
    return _GGUF_FROM_LLAMA[re.sub(r"\.\d+\.", ".{i}.", hf_name)].format(i=layer.group(1) if layer else 0)


def _gguf_kind(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """Norms and biases stay F32 and a matrix whose rows hold no whole number of blocks F16, as llama.cpp's
    converter stores them; other matrices `qtype`."""
    if len(shape) == 1:
        return GGMLQuantizationType.F32
    return qtype if shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0 else GGMLQuantizationType.F16


def _gguf_data(t: torch.Tensor, g: str, kind: GGMLQuantizationType, c, permute: bool) -> np.ndarray:
    """The bytes (as a numpy array) of one tensor in `kind`; `permute`: llama's Q/K rows in llama.cpp's
    interleaved pair order (HF stores the two halves of each head's rotation apart)."""
    a = t.detach().to("cpu", torch.float32).numpy()
    if permute and g.endswith(("attn_q.weight", "attn_k.weight")):
        heads = c.n_heads if g.endswith("attn_q.weight") else c.n_kv_heads
        a = a.reshape(heads, 2, a.shape[0] // heads // 2, a.shape[1]).swapaxes(1, 2).reshape(a.shape)
    return quantize(np.ascontiguousarray(a), kind)


def _vocabulary(tokenizer, vocab_size: int) -> dict[str, Any]:
    """The `tokenizer.ggml.*` values of an lmforge Tokenizer, its vocabulary padded to vocab_size with unused
    [PADn] entries (as llama.cpp's converter pads). A byte-level BPE becomes 'gpt2' with the `pre` whose splitting
    is this tokenizer's; a SentencePiece-style BPE (byte fallback, "\u2581" for spaces: LLaMA-2, Mistral, TinyLlama)
    becomes 'llama', each piece scored minus the rank of the merge that makes it. Either way the vocabulary as
    llama.cpp will read it must encode probe texts exactly as this tokenizer does."""
    backend = tokenizer.backend
    spec = json.loads(backend.to_str())
    decoder, model = spec.get("decoder") or {}, spec.get("model") or {}
    steps = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    sentencepiece = model.get("byte_fallback") and any(d.get("type") == "ByteFallback" for d in steps)
    if model.get("type") != "BPE" or not (sentencepiece or decoder.get("type") == "ByteLevel"):
        raise ValueError(f"GGUF export needs a byte-level BPE or a SentencePiece-style BPE tokenizer; this one is "
                         f"{model.get('type')} with a {decoder.get('type')} decoder")
    vocab = backend.get_vocab(with_added_tokens=True)
    n = len(vocab)
    if sorted(vocab.values()) != list(range(n)):
        raise ValueError("GGUF export needs token ids 0..n-1 without gaps; this tokenizer's ids have gaps")
    if n > vocab_size:
        raise ValueError(f"the tokenizer has {n} tokens but the model's embedding only {vocab_size} rows")
    tokens = sorted(vocab, key=vocab.__getitem__)
    added = backend.get_added_tokens_decoder()
    types = [(_CONTROL if added[i].special else _USER_DEFINED) if i in added else _NORMAL for i in range(n)]
    tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]
    types += [_UNUSED] * (vocab_size - n)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if any(len(m.split(" ")) != 2 for m in merges):
        raise ValueError("a BPE merge contains a space, which GGUF's 'left right' merge strings cannot hold")
    probes = [backend.encode(t, add_special_tokens=False).ids for t in _PROBES]

    def check(candidate: Tokenizer, what: str) -> None:
        if [candidate.encode(t, add_special_tokens=False).ids for t in _PROBES] != probes:
            raise ValueError(f"read back as llama.cpp's {what} vocabulary, the tokenizer encodes differently; "
                             "llama.cpp would tokenize differently")

    if sentencepiece:
        rank = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", ""), r)
        unk = model.get("unk_token")
        for i, t in enumerate(tokens[:n]):
            if re.fullmatch(r"<0x[0-9A-F]{2}>", t):
                types[i] = _BYTE
            elif t == unk:
                types[i] = _UNKNOWN
        # a merged piece: minus its merge's rank (pieces merge best-score first); the rest cannot be merged into
        scores = [-float(rank[t]) if t in rank else -1000.0 if k == _UNUSED else 0.0 if k != _NORMAL else -1e9
                  for t, k in zip(tokens, types)]
        add_space_prefix = _space_prefix(spec)
        check(_sentencepiece_backend(tokens, scores, types, add_space_prefix), "'llama' (SentencePiece)")
        return {"model": "llama", "pre": "default", "tokens": tokens, "token_type": types, "scores": scores,
                "add_space_prefix": add_space_prefix}
    want = _splitting(spec)
    for pre in _PRE_CANDIDATES:
        candidate = _backend(tokens, merges, types, pre)
        if _splitting(json.loads(candidate.to_str())) == want:
            check(candidate, repr(pre))
            return {"model": "gpt2", "pre": pre, "tokens": tokens, "token_type": types, "merges": merges,
                    "add_space_prefix": False}
    raise ValueError(f"the tokenizer splits text ({want}) in a way none of llama.cpp's pre-tokenizers known to "
                     f"lmforge ({', '.join(_PRE_CANDIDATES)}) does; llama.cpp would tokenize differently")


def _space_prefix(spec: dict[str, Any]) -> bool:
    """Whether a SentencePiece-style tokenizer.json puts "\u2581" before the text (Metaspace, or the older
    normalizer that prepends it)."""
    pre, norm = spec.get("pre_tokenizer") or {}, spec.get("normalizer") or {}
    if pre.get("type") == "Metaspace":
        return pre.get("prepend_scheme", "always") != "never" and pre.get("add_prefix_space", True)
    norms = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    return any(x.get("type") == "Prepend" for x in norms)


def _splitting(spec: dict[str, Any]) -> list[tuple[Any, ...]]:
    """How a tokenizer.json splits text before BPE, as comparable steps (fields that change no id left out)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    out: list[tuple[Any, ...]] = []
    for step in steps:
        kind = step.get("type")
        if kind == "Digits":
            out.append((kind, step.get("individual_digits")))
        elif kind == "ByteLevel":
            out.append((kind, step.get("add_prefix_space"), step.get("use_regex", True)))
        elif kind == "Split":
            pattern = step.get("pattern") or {}
            out.append((kind, pattern.get("Regex", pattern.get("String")), step.get("behavior"), step.get("invert")))
        else:
            out.append((kind, json.dumps(step, sort_keys=True)))
    return [*out, ("ignore_merges", bool((spec.get("model") or {}).get("ignore_merges")))]
