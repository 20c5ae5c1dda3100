"""One `ModelConfig` for every architecture; presets are data; the Hugging Face config mapping."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "alibi", "sinusoidal", "learned", "none")
MLPS = ("swiglu", "gelu")
GELU_APPROX = ("tanh", "none")


class ConfigError(ValueError):
    """A model configuration that cannot describe a working network."""


@dataclass
class ModelConfig:
    """Every architectural choice as an explicit field; derived fields are filled in `__post_init__`."""

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # MHA: = n_heads, MQA: 1, GQA: groups; None -> n_heads
    head_dim: int | None = None  # None -> dim // n_heads
    ffn_dim: int | None = None  # None -> 4 * dim (gelu) or LLaMA's 8/3 * dim rounded to 256 (swiglu)
    max_seq_len: int = 4096
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0  # share of head_dim that rotates (ChatGLM2: 0.5)
    rope_interleaved: bool = False  # rotate pairs (x0, x1) instead of halves (x[:d/2], x[d/2:])
    sliding_window: int | None = None  # attend to at most this many previous tokens (Mistral)
    mlp: str = "swiglu"
    gelu_approx: str = "tanh"  # GPT-2 / BLOOM use the tanh approximation
    qkv_bias: bool = False
    bias: bool = False  # bias on the attention output and MLP linears
    embed_norm: bool = False  # a norm right after the token embedding (BLOOM)
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("norm", self.norm, NORMS),
            ("position", self.position, POSITIONS),
            ("mlp", self.mlp, MLPS),
            ("gelu_approx", self.gelu_approx, GELU_APPROX),
        ):
            if value not in allowed:
                raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} "
                "(MHA: n_kv_heads = n_heads, MQA: 1, GQA: a divisor of n_heads)"
            )
        if self.head_dim is None:
            if self.dim % self.n_heads != 0:
                raise ConfigError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.ffn_dim is None:
            self.ffn_dim = 4 * self.dim if self.mlp == "gelu" else 256 * ((int(8 * self.dim / 3) + 255) // 256)
        if not 0.0 < self.rope_fraction <= 1.0:
            raise ConfigError(f"rope_fraction must be in (0, 1], got {self.rope_fraction}")
        if self.position == "rope" and self.rope_dim % 2 != 0:
            raise ConfigError(f"rope_fraction * head_dim = {self.rope_dim} must be even")
        if self.position == "sinusoidal" and self.dim % 2 != 0:
            raise ConfigError(f"sinusoidal positions need an even dim, got {self.dim}")

    @property
    def rope_dim(self) -> int:
        """Number of dimensions of each head that RoPE rotates."""
        return int(self.head_dim * self.rope_fraction)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_LLAMA2 = dict(vocab_size=32000, max_seq_len=4096, norm_eps=1e-5)
_GPT2 = dict(norm="layernorm", position="learned", mlp="gelu", qkv_bias=True, bias=True, tie_embeddings=True)
PRESETS: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(_LLAMA2, dim=4096, n_layers=32, n_heads=32, ffn_dim=11008),
    "llama2-13b": dict(_LLAMA2, dim=5120, n_layers=40, n_heads=40, ffn_dim=13824),
    "llama2-70b": dict(_LLAMA2, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672),
    "chatglm2-6b": dict(
        vocab_size=65024, dim=4096, n_layers=28, n_heads=32, n_kv_heads=2, head_dim=128, ffn_dim=13696,
        max_seq_len=32768, rope_fraction=0.5, rope_interleaved=True, qkv_bias=True,
    ),
    "smollm2-135m": dict(
        vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, max_seq_len=8192,
        rope_theta=100000.0, tie_embeddings=True,
    ),
    "qwen2-0.5b": dict(
        vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864, max_seq_len=32768,
        norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True, tie_embeddings=True,
    ),
    "gpt2-124m": dict(_GPT2, vocab_size=50257, dim=768, n_layers=12, n_heads=12, max_seq_len=1024),
    "bloom-560m": dict(
        vocab_size=250880, dim=1024, n_layers=24, n_heads=16, max_seq_len=2048, norm="layernorm",
        position="alibi", mlp="gelu", qkv_bias=True, bias=True, embed_norm=True, tie_embeddings=True,
    ),
    # tiny models for tests, demos and the quickstart
    "tiny-llama": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=256),
    "tiny-gpt2": dict(_GPT2, vocab_size=512, dim=64, n_layers=2, n_heads=4, max_seq_len=256),
    "tiny-glm": dict(
        vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=256,
        rope_fraction=0.5, rope_interleaved=True, qkv_bias=True,
    ),
}

# Published parameter counts, checked by tests/test_config.py on the meta device.
PUBLISHED_PARAMS = {
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "chatglm2-6b": 6_243_584_000,
    "smollm2-135m": 134_515_008,
    "qwen2-0.5b": 494_032_768,
    "gpt2-124m": 124_439_808,
    "bloom-560m": 559_214_592,
}


# ---- Hugging Face config.json <-> ModelConfig ----------------------------------------------------

def _rope_theta(hf: dict[str, Any], default: float = 10000.0) -> float:
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", default)))


def from_hf_config(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Reads a Hugging Face `config.json` dict (llama, mistral, qwen2, gpt2, bloom, glm, chatglm)."""
    mt = hf.get("model_type")
    try:
        if "lmforge" in hf:  # written by lmforge.save: exact round trip
            return ModelConfig.from_dict(hf["lmforge"])
        if mt in ("llama", "mistral", "qwen2", "glm"):
            scaling = hf.get("rope_scaling") or (hf.get("rope_parameters") or {})
            if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
                raise ConfigError(f"{source}: rope scaling {scaling} is not supported yet")
            act = hf.get("hidden_act", "silu")
            if act != "silu":
                raise ConfigError(f"{source}: hidden_act={act!r} is not supported for {mt} (only silu)")
            partial = (hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor"))
            return ModelConfig(
                vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"),
                head_dim=hf.get("head_dim"), ffn_dim=hf["intermediate_size"],
                max_seq_len=hf.get("max_position_embeddings", 4096), norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=_rope_theta(hf), tie_embeddings=hf.get("tie_word_embeddings", mt == "qwen2"),
                qkv_bias=hf.get("attention_bias", mt in ("qwen2", "glm")),
                bias=bool(hf.get("mlp_bias", False)) if mt == "llama" else False,
                rope_fraction=float(partial or (0.5 if mt == "glm" else 1.0)),
                rope_interleaved=mt == "glm",
                sliding_window=hf.get("sliding_window") if mt == "mistral" else None,
            )
        if mt == "chatglm":
            n_heads = hf["num_attention_heads"]
            if not hf.get("rmsnorm", True) or hf.get("add_bias_linear", False):
                raise ConfigError(f"{source}: only ChatGLM2/3 (rmsnorm, no linear bias) is supported")
            return ModelConfig(
                vocab_size=hf["padded_vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_layers"],
                n_heads=n_heads,
                n_kv_heads=hf["multi_query_group_num"] if hf.get("multi_query_attention") else n_heads,
                head_dim=hf.get("kv_channels"), ffn_dim=hf["ffn_hidden_size"],
                max_seq_len=hf.get("seq_length", 2048), norm_eps=hf.get("layernorm_epsilon", 1e-5),
                rope_theta=10000.0 * hf.get("rope_ratio", 1.0), rope_fraction=0.5, rope_interleaved=True,
                qkv_bias=hf.get("add_qkv_bias", True), tie_embeddings=False,
            )
        if mt == "gpt2":
            act = hf.get("activation_function", "gelu_new")
            return ModelConfig(
                vocab_size=hf["vocab_size"], dim=hf["n_embd"], n_layers=hf["n_layer"], n_heads=hf["n_head"],
                ffn_dim=hf.get("n_inner") or 4 * hf["n_embd"], max_seq_len=hf["n_positions"],
                norm_eps=hf.get("layer_norm_epsilon", 1e-5), gelu_approx="none" if act == "gelu" else "tanh",
                **{k: v for k, v in _GPT2.items()},
            )
        if mt == "bloom":
            dim = hf.get("hidden_size", hf.get("n_embed"))
            return ModelConfig(
                vocab_size=hf["vocab_size"], dim=dim, n_layers=hf.get("n_layer", hf.get("num_hidden_layers")),
                n_heads=hf.get("n_head", hf.get("num_attention_heads")), ffn_dim=4 * dim,
                max_seq_len=hf.get("seq_length", 2048), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                norm="layernorm", position="alibi", mlp="gelu", qkv_bias=True, bias=True, embed_norm=True,
                tie_embeddings=hf.get("tie_word_embeddings", True),
            )
    except KeyError as e:
        raise ConfigError(f"{source}: model_type {mt!r} needs the key {e.args[0]!r}") from None
    raise ConfigError(
        f"{source}: model_type {mt!r} is not supported; supported: llama, mistral, qwen2, glm, chatglm, gpt2, bloom"
    )


def hf_model_type(c: ModelConfig) -> str:
    """The `transformers` family whose code computes exactly this config, or 'lmforge' when none does."""
    rope_llama = c.position == "rope" and not c.embed_norm and c.norm == "rmsnorm" and c.mlp == "swiglu"
    if rope_llama and c.rope_fraction == 1.0 and not c.rope_interleaved and not c.bias:
        if c.sliding_window is not None:
            return "lmforge" if c.qkv_bias else "mistral"
        return "qwen2" if c.qkv_bias else "llama"
    if rope_llama and c.rope_interleaved and c.rope_fraction == 0.5 and not c.bias and c.sliding_window is None:
        return "glm"
    gpt = c.norm == "layernorm" and c.mlp == "gelu" and c.qkv_bias and c.bias and c.tie_embeddings
    gpt = gpt and c.head_dim * c.n_heads == c.dim and c.n_kv_heads == c.n_heads
    if gpt and c.position == "learned" and not c.embed_norm:
        return "gpt2"
    if gpt and c.position == "alibi" and c.embed_norm and c.gelu_approx == "tanh" and c.ffn_dim == 4 * c.dim:
        return "bloom"
    return "lmforge"


def to_hf_config(c: ModelConfig, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None) -> dict[str, Any]:
    """A `config.json` dict that `transformers` loads where the family exists there; the exact lmforge
    config rides along under the key `lmforge`."""
    mt = hf_model_type(c)
    out: dict[str, Any] = {"model_type": mt, "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    if mt in ("llama", "mistral", "qwen2", "glm"):
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "glm": "GlmForCausalLM"}[mt]
        rope = {"rope_type": "default", "rope_theta": c.rope_theta}
        if mt == "glm":
            rope["partial_rotary_factor"] = c.rope_fraction
        out.update(
            architectures=[arch], vocab_size=c.vocab_size, hidden_size=c.dim, num_hidden_layers=c.n_layers,
            num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
            intermediate_size=c.ffn_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
            rope_theta=c.rope_theta, rope_parameters=rope, tie_word_embeddings=c.tie_embeddings,
            hidden_act="silu", attention_bias=c.qkv_bias, initializer_range=c.init_std,
        )
        if mt in ("qwen2", "mistral"):
            out.update(use_sliding_window=mt == "mistral", sliding_window=c.sliding_window)
    elif mt == "gpt2":
        out.update(
            architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size, n_embd=c.dim, n_layer=c.n_layers,
            n_head=c.n_heads, n_inner=c.ffn_dim, n_positions=c.max_seq_len, layer_norm_epsilon=c.norm_eps,
            activation_function="gelu_new" if c.gelu_approx == "tanh" else "gelu", tie_word_embeddings=True,
        )
    elif mt == "bloom":
        out.update(
            architectures=["BloomForCausalLM"], vocab_size=c.vocab_size, hidden_size=c.dim, n_layer=c.n_layers,
            n_head=c.n_heads, layer_norm_epsilon=c.norm_eps, seq_length=c.max_seq_len, tie_word_embeddings=True,
        )
    out["lmforge"] = c.to_dict()
    return out


