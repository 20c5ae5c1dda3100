"""Declarative key maps between lmforge's state_dict and each Hugging Face family's, one table per family.

A table maps an lmforge key template (`layers.{i}.…`) to one HF key, or to a tuple of HF keys that are
concatenated along dim 0 (fused QKV, fused gate-up). A few families also need a tensor transform
(GPT-2's Conv1D weights are transposed; BLOOM interleaves Q, K, V per head)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmforge.checkpoint.errors import CheckpointError
from lmforge.config import ModelConfig

KeyTable = dict[str, "str | tuple[str, ...]"]


def _llama_like(gate_up: str | tuple[str, ...]) -> KeyTable:
    a, m = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    return {
        "tok_emb.weight": "model.embed_tokens.weight",
        "layers.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
        "layers.{i}.attn.qkv.weight": (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
        "layers.{i}.attn.qkv.bias": (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
        "layers.{i}.attn.out.weight": a + "o_proj.weight",
        "layers.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
        "layers.{i}.mlp.gate_up.weight": gate_up,
        "layers.{i}.mlp.down.weight": m + "down_proj.weight",
        "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }


LLAMA = _llama_like(("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"))
GLM = _llama_like("model.layers.{i}.mlp.gate_up_proj.weight")

_CG = "transformer.encoder.layers.{i}."
CHATGLM: KeyTable = {
    "tok_emb.weight": "transformer.embedding.word_embeddings.weight",
    "layers.{i}.attn_norm.weight": _CG + "input_layernorm.weight",
    "layers.{i}.attn.qkv.weight": _CG + "self_attention.query_key_value.weight",
    "layers.{i}.attn.qkv.bias": _CG + "self_attention.query_key_value.bias",
    "layers.{i}.attn.out.weight": _CG + "self_attention.dense.weight",
    "layers.{i}.mlp_norm.weight": _CG + "post_attention_layernorm.weight",
    "layers.{i}.mlp.gate_up.weight": _CG + "mlp.dense_h_to_4h.weight",
    "layers.{i}.mlp.down.weight": _CG + "mlp.dense_4h_to_h.weight",
    "norm.weight": "transformer.encoder.final_layernorm.weight",
    "lm_head.weight": "transformer.output_layer.weight",
}


def _gpt_like(attn: str, qkv: str, out: str, up: str, down: str, emb: str, final: str) -> KeyTable:
    h = "transformer.h.{i}."
    table: KeyTable = {"tok_emb.weight": f"transformer.{emb}.weight", "lm_head.weight": "lm_head.weight"}
    for p in ("weight", "bias"):
        table.update({
            f"layers.{{i}}.attn_norm.{p}": f"{h}{'ln_1' if attn == 'attn' else 'input_layernorm'}.{p}",
            f"layers.{{i}}.attn.qkv.{p}": f"{h}{attn}.{qkv}.{p}",
            f"layers.{{i}}.attn.out.{p}": f"{h}{attn}.{out}.{p}",
            f"layers.{{i}}.mlp_norm.{p}": f"{h}{'ln_2' if attn == 'attn' else 'post_attention_layernorm'}.{p}",
            f"layers.{{i}}.mlp.up.{p}": f"{h}mlp.{up}.{p}",
            f"layers.{{i}}.mlp.down.{p}": f"{h}mlp.{down}.{p}",
            f"norm.{p}": f"transformer.{final}.{p}",
        })
    return table


GPT2 = {**_gpt_like("attn", "c_attn", "c_proj", "c_fc", "c_proj", "wte", "ln_f"), "pos_emb.weight": "transformer.wpe.weight"}
BLOOM = {
    **_gpt_like("self_attention", "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "word_embeddings", "ln_f"),
    "emb_norm.weight": "transformer.word_embeddings_layernorm.weight",
    "emb_norm.bias": "transformer.word_embeddings_layernorm.bias",
}


# ---- tensor transforms (from HF, to HF) ----------------------------------------------------------------------

def _transpose(t: torch.Tensor, c: ModelConfig) -> torch.Tensor:  # GPT-2 Conv1D stores (in, out)
    return t.t() if t.dim() == 2 else t


def _bloom_qkv_from_hf(t: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    return t.reshape(c.n_heads, 3, c.head_dim, -1).transpose(0, 1).reshape(t.shape)  # (H, 3, D) -> (3, H, D)


def _bloom_qkv_to_hf(t: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    return t.reshape(3, c.n_heads, c.head_dim, -1).transpose(0, 1).reshape(t.shape)  # (3, H, D) -> (H, 3, D)


Transform = Callable[[torch.Tensor, ModelConfig], torch.Tensor]
_CONV1D = ("layers.{i}.attn.qkv.weight", "layers.{i}.attn.out.weight", "layers.{i}.mlp.up.weight",
           "layers.{i}.mlp.down.weight")


@dataclass
class Family:
    """One checkpoint family: its key table, transforms, and HF keys that carry no weights (buffers)."""

    keys: KeyTable | None  # None: lmforge's own names (a config no HF family computes)
    from_hf: dict[str, Transform] = field(default_factory=dict)
    to_hf: dict[str, Transform] = field(default_factory=dict)
    ignore: tuple[str, ...] = ()  # regexes of HF keys to skip when reading


FAMILIES: dict[str, Family] = {
    "llama": Family(LLAMA, ignore=(r".*rotary_emb\.inv_freq$",)),
    "mistral": Family(LLAMA, ignore=(r".*rotary_emb\.inv_freq$",)),
    "qwen2": Family(LLAMA, ignore=(r".*rotary_emb\.inv_freq$",)),
    "glm": Family(GLM, ignore=(r".*rotary_emb\.inv_freq$",)),
    "chatglm": Family(CHATGLM, ignore=(r"transformer\.rotary_pos_emb\.inv_freq$",)),
    "gpt2": Family(GPT2, {k: _transpose for k in _CONV1D}, {k: _transpose for k in _CONV1D},
                   ignore=(r".*attn\.(masked_)?bias$",)),
    "bloom": Family(BLOOM, {f"layers.{{i}}.attn.qkv.{p}": _bloom_qkv_from_hf for p in ("weight", "bias")},
                    {f"layers.{{i}}.attn.qkv.{p}": _bloom_qkv_to_hf for p in ("weight", "bias")}),
    "lmforge": Family(None),
}
_LAYER = re.compile(r"^layers\.(\d+)\.")


def key_template(key: str) -> tuple[str, str | None]:
    """lmforge `key` as its table template (`layers.{i}.…`) and its layer number (None outside the layers)."""
    m = _LAYER.match(key)
    return (_LAYER.sub("layers.{i}.", key), m.group(1)) if m else (key, None)


def split_sizes(template: str, c: ModelConfig) -> list[int]:
    """The row sizes a fused tensor (QKV, gate-up) of `template` splits into, in its HF keys' order."""
    if template.startswith("layers.{i}.attn.qkv."):
        return [c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim]
    if template == "layers.{i}.mlp.gate_up.weight":
        return [c.ffn_dim, c.ffn_dim]
    raise KeyError(template)


def hf_names(key: str, family: Family) -> tuple[str, ...]:
    """The HF tensor names that hold lmforge's `key`."""
    template, i = key_template(key)
    if family.keys is None:  # lmforge's own names
        return (key,)
    if template not in family.keys:
        raise KeyError(key)
    names = family.keys[template]
    names = names if isinstance(names, tuple) else (names,)
    return tuple(n.replace("{i}", i) if i is not None else n for n in names)


def from_hf(expected: dict[str, torch.Size], get: Callable[[str], torch.Tensor], available: set[str],
            family_name: str, c: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """Builds lmforge's state_dict for the keys in `expected` from HF tensors fetched by `get(name)`.

    Missing tensors, leftover tensors and wrong shapes raise `CheckpointError` naming `source`."""
    family = FAMILIES[family_name]
    out, used = {}, set()
    for key, shape in expected.items():
        template, _ = key_template(key)
        if key == "lm_head.weight" and c.tie_embeddings:
            continue
        names = hf_names(key, family)
        missing = [n for n in names if n not in available]
        if missing:
            raise CheckpointError(f"{source}: tensor {missing[0]!r} is missing (needed for {key})")
        parts = [get(n) for n in names]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if template in family.from_hf:
            t = family.from_hf[template](t, c)
        if t.shape != shape:
            raise CheckpointError(f"{source}: tensor {' + '.join(names)} has shape {tuple(t.shape)}, "
                                  f"the config needs {tuple(shape)} (for {key})")
        out[key] = t
        used.update(names)
    ignore = [re.compile(p) for p in family.ignore]
    if c.tie_embeddings:
        ignore.append(re.compile(re.escape(hf_names("lm_head.weight", family)[0]) + "$"))
    extra = sorted(n for n in available - used if not any(p.match(n) for p in ignore))
    if extra:
        raise CheckpointError(f"{source}: unexpected tensors the config does not use, e.g. {extra[:3]} "
                              f"({len(extra)} in all) — does config.json match the weights?")
    return out


def to_hf(state: dict[str, torch.Tensor], family_name: str, c: ModelConfig) -> dict[str, torch.Tensor]:
    """Splits and renames lmforge's state_dict into the HF family's tensors (tied lm_head left out)."""
    family = FAMILIES[family_name]
    out = {}
    for key, t in state.items():
        if key == "lm_head.weight" and c.tie_embeddings:
            continue
        template, _ = key_template(key)
        if template in family.to_hf:
            t = family.to_hf[template](t, c)
        names = hf_names(key, family)
        parts = t.split(split_sizes(template, c), dim=0) if len(names) > 1 else (t,)
        out.update({n: p.contiguous() for n, p in zip(names, parts)})
    return out
