"""Same weights in, same logits out: lmforge against `transformers`, every family, fp32 on CPU."""

import json

import pytest
import torch

import lmforge
from tests.fixtures.decoding import stepwise_logits
from tests.fixtures.hf_models import FAMILIES, VOCAB, hf_model

ATOL = 1e-4


def _ids(batch=2, seq=12, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_both_ways(family, tmp_path):
    import transformers as tf

    ref = hf_model(family)
    ref.save_pretrained(tmp_path / "hf")
    model, _ = lmforge.load(tmp_path / "hf", device="cpu")
    ids = _ids()
    with torch.no_grad():
        expected = ref(ids).logits
        torch.testing.assert_close(model(ids), expected, atol=ATOL, rtol=1e-4)

    lmforge.save(model, None, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == ref.config.model_type
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, expected, atol=ATOL, rtol=1e-4)


def test_chatglm2_layout_matches_glm_reference(tmp_path):
    """ChatGLM2's own names and config keys (query_key_value, dense_h_to_4h, multi_query_group_num, ...)."""
    from safetensors.torch import save_file

    ref = hf_model("glm")
    c = ref.config
    sd = ref.state_dict()
    out = {"transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
           "transformer.output_layer.weight": sd["lm_head.weight"],
           "transformer.rotary_pos_emb.inv_freq": torch.ones(8)}
    for i in range(c.num_hidden_layers):
        a, L = f"model.layers.{i}.self_attn.", f"transformer.encoder.layers.{i}."
        for p in ("weight", "bias"):
            out[L + f"self_attention.query_key_value.{p}"] = torch.cat([sd[a + f"{n}_proj.{p}"] for n in "qkv"])
        out[L + "self_attention.dense.weight"] = sd[a + "o_proj.weight"]
        out[L + "input_layernorm.weight"] = sd[f"model.layers.{i}.input_layernorm.weight"]
        out[L + "post_attention_layernorm.weight"] = sd[f"model.layers.{i}.post_attention_layernorm.weight"]
        out[L + "mlp.dense_h_to_4h.weight"] = sd[f"model.layers.{i}.mlp.gate_up_proj.weight"]
        out[L + "mlp.dense_4h_to_h.weight"] = sd[f"model.layers.{i}.mlp.down_proj.weight"]
    folder = tmp_path / "chatglm2"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in out.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "chatglm", "architectures": ["ChatGLMModel"], "padded_vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "num_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "kv_channels": c.head_dim, "multi_query_attention": True, "multi_query_group_num": c.num_key_value_heads,
        "ffn_hidden_size": c.intermediate_size, "layernorm_epsilon": c.rms_norm_eps, "rmsnorm": True,
        "add_qkv_bias": True, "add_bias_linear": False, "seq_length": 64, "original_rope": True,
        "apply_residual_connection_post_layernorm": False, "post_layer_norm": True,
    }))
    model, _ = lmforge.load(folder, device="cpu")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama-gqa", "gpt2", "bloom"])
def test_kv_cache_decoding_matches_full_forward(family, tmp_path):
    ref = hf_model(family)
    ref.save_pretrained(tmp_path)
    model, _ = lmforge.load(tmp_path, device="cpu")
    ids = _ids(batch=2, seq=10)
    with torch.no_grad():
        full = model(ids)
    torch.testing.assert_close(stepwise_logits(model, ids, prefill=6, cache_len=32), full, atol=ATOL, rtol=1e-4)


def test_sharded_save_loads_back(tmp_path):
    ref = hf_model("llama-mha")
    ref.save_pretrained(tmp_path / "hf")
    model, _ = lmforge.load(tmp_path / "hf", device="cpu")
    lmforge.save(model, None, tmp_path / "sharded", max_shard_size=50_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 2
    again, _ = lmforge.load(tmp_path / "sharded", device="cpu")
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)


def test_lmforge_only_config_round_trips(tmp_path):
    """A config no HF family computes (sinusoidal positions, GELU + RMSNorm) saves under lmforge's names."""
    cfg = lmforge.ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, position="sinusoidal", mlp="gelu",
                              max_seq_len=32)
    torch.manual_seed(0)
    model = lmforge.Transformer(cfg).eval()
    lmforge.save(model, None, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "lmforge"
    again, _ = lmforge.load(tmp_path / "m", device="cpu")
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_gradients_match_transformers(family, tmp_path):
    """The training path — `model(ids, labels=...)`, the blockwise LM head + cross-entropy and the
    hand-written backward passes (RMSNorm, SwiGLU) — against transformers' autograd, parameter by parameter."""
    from lmforge.checkpoint.hf import to_hf
    from lmforge.config import hf_model_type
    from lmforge.data.labels import IGNORE

    ref = hf_model(family)  # eval mode: no dropout; gradients still flow
    ref.save_pretrained(tmp_path / "hf")
    model, _ = lmforge.load(tmp_path / "hf", device="cpu")
    ids = _ids()
    labels = torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), IGNORE)], dim=1)
    labels[0, :3] = IGNORE  # and a few positions that do not count
    hf_labels = ids.clone()
    hf_labels[0, 1:4] = IGNORE  # the same positions, before transformers' own shift

    total, n = model(ids, labels=labels)
    (total / n).backward()
    expected = ref(ids, labels=hf_labels).loss
    expected.backward()
    torch.testing.assert_close(total / n, expected, atol=1e-5, rtol=1e-5)
    ours = to_hf({k: p.grad for k, p in model.named_parameters()}, hf_model_type(model.config), model.config)
    theirs = {k: p.grad for k, p in ref.named_parameters()}
    assert ours.keys() <= theirs.keys()
    for k, g in ours.items():
        torch.testing.assert_close(g, theirs[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
