"""ModelConfig: published parameter counts (on the meta device) and clear validation messages."""

import pytest
import torch

from lmforge.config import PRESETS, PUBLISHED_PARAMS, ConfigError, ModelConfig, from_hf_config
from lmforge.model import Transformer


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_count_matches_published(name):
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset(name))
    assert model.num_params() == PUBLISHED_PARAMS[name]
    assert model.tok_emb.weight.device.type == "meta"  # nothing was allocated


def test_every_preset_builds():
    for name in PRESETS:
        c = ModelConfig.from_preset(name)
        with torch.device("meta"):
            model = Transformer(c)
        assert len(model.layers) == c.n_layers and model.tok_emb.weight.shape == (c.vocab_size, c.dim), name
        qkv = model.layers[0].attn.qkv.weight
        assert qkv.shape == ((c.n_heads + 2 * c.n_kv_heads) * c.head_dim, c.dim), name
        assert (model.lm_head.weight is model.tok_emb.weight) == c.tie_embeddings, name
        assert all(p.is_meta for p in model.parameters()), name


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_heads=8, n_kv_heads=3), "n_heads=8 must be a multiple of n_kv_heads=3"),
    (dict(norm="batchnorm"), "norm='batchnorm' is not one of rmsnorm, layernorm"),
    (dict(position="xpos"), "position='xpos'"),
    (dict(mlp="relu"), "mlp='relu'"),
    (dict(dim=100, n_heads=8), "dim=100 is not divisible by n_heads=8"),
    (dict(rope_fraction=0.0), "rope_fraction"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
])
def test_validation_messages(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**{"dim": 64, "n_heads": 4, "n_layers": 1, "vocab_size": 10, **kwargs})


def test_unknown_preset_and_keys():
    with pytest.raises(ConfigError, match="unknown preset 'llama9'"):
        ModelConfig.from_preset("llama9")
    with pytest.raises(ConfigError, match="unknown model config keys: n_layer"):
        ModelConfig.from_dict({"n_layer": 2})


def test_derived_fields():
    c = ModelConfig(dim=4096, n_heads=32)
    assert (c.n_kv_heads, c.head_dim, c.ffn_dim) == (32, 128, 11008)  # LLaMA's 8/3 * dim rounded to 256
    assert ModelConfig.from_preset("chatglm2-6b").rope_dim == 64


def test_unsupported_hf_config_is_named():
    with pytest.raises(ConfigError, match="config.json: model_type 't5' is not supported"):
        from_hf_config({"model_type": "t5"})
    with pytest.raises(ConfigError, match="needs the key 'hidden_size'"):
        from_hf_config({"model_type": "llama", "vocab_size": 10})
