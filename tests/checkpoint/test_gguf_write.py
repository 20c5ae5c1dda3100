"""write_gguf / `lmforge convert X model.gguf`: a model trained here runs in llama.cpp. Checked by reading the
file back with lmforge and with transformers' own GGUF loader (same logits, same tokens), by the tensor types
each outtype gives, and on SmolLM2: the written file's llama.* and tokenizer.ggml.* metadata and its tensor
names and shapes equal those of the file llama.cpp's converter made."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import lmforge
from lmforge.checkpoint import gguf as gguf_module
from lmforge.checkpoint.gguf import write_gguf
from lmforge.checkpoint.hf import to_hf
from lmforge.cli import main, run
from lmforge.generate import generate
from lmforge.tokenizer import SpecialTokens, train_tokenizer
from tests.checkpoint.test_gguf_read import TEXTS
from tests.fixtures.smollm2 import SMOLLM2, needs_smollm2

CORPUS = ["The cat sat on the mat; it's 12:30 and 2024 was long.", "你好，世界！Ünïcödé and emoji 🤗.",
          "def f(x):\n    return x * 2  # twice\n", "A dog ran in the park with 3 friends."] * 4
PROBES = [*TEXTS, "the cat 1234 sat", "<|im_start|>user\nhi<|im_end|>\n"]


@pytest.fixture(scope="module")
def pair():
    """A tiny llama (GQA; ffn 80: its down projection's rows of 80 split into no q8_0 blocks) and lmforge's own
    tokenizer (digits split one by one, ChatML template, bos added); the embedding has 7 rows more than tokens."""
    tok = train_tokenizer(CORPUS, 300, special_tokens=SpecialTokens(bos="<s>"), add_bos=True)
    torch.manual_seed(0)
    config = lmforge.ModelConfig.from_preset("tiny-llama", vocab_size=tok.vocab_size + 7, ffn_dim=80, max_seq_len=64,
                                             rope_theta=50000.0, norm_eps=1e-6, init_std=0.2)
    return lmforge.Transformer(config).eval(), tok


def _ids(model) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))


def test_f32_round_trip_is_exact(pair, tmp_path: Path) -> None:
    model, tok = pair
    path = write_gguf(model, tok, tmp_path / "tiny.gguf", "f32")
    back, tok2 = lmforge.load(path, device="cpu")
    assert back.config.vocab_size == model.config.vocab_size and back.config.rope_theta == 50000.0
    with torch.no_grad():
        torch.testing.assert_close(back(_ids(model)), model(_ids(model)), atol=0, rtol=0)
    for text in PROBES:
        assert tok2.encode(text) == tok.encode(text), text
        assert tok2.decode(tok2.encode(text)) == tok.decode(tok.encode(text))
    assert (tok2.bos_token, tok2.eos_token, tok2.pad_token, tok2.add_bos) == (tok.bos_token, tok.eos_token,
                                                                             tok.pad_token, True)
    assert tok2.chat_template == tok.chat_template
    fields = {k: f.contents() for k, f in GGUFReader(path).fields.items()}
    assert fields["tokenizer.ggml.pre"] == "smollm"  # llama.cpp's digit-splitting GPT-2 regex, as lmforge trains
    assert fields["tokenizer.ggml.tokens"][-7:] == [f"[PAD{i}]" for i in range(tok.vocab_size, tok.vocab_size + 7)]
    assert fields["tokenizer.ggml.token_type"][-8:] == [1] + [5] * 7  # a normal token, then unused padding
    assert fields["tokenizer.ggml.token_type"][tok.eos_id] == 3  # control: matched whole, never split
    assert not list(tmp_path.glob(".*tmp*"))


def test_transformers_reads_the_file_alike(pair, tmp_path: Path) -> None:
    """transformers' GGUF loader (its own dequantizer, Q/K un-permute and tokenizer conversion)."""
    tf = pytest.importorskip("transformers")
    model, tok = pair
    path = write_gguf(model, tok, tmp_path / "tiny.gguf", "f32")
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(_ids(model)).logits, model(_ids(model)), atol=1e-4, rtol=1e-4)
    hf_tok = tf.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    # transformers' converter adds an <|endoftext|> token of its own to a GPT-2-style vocabulary lacking one
    for text in [t for t in PROBES if "<|endoftext|>" not in t]:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text, add_bos=False), text


# relative error of the logits: each weight rounds by ~0.05% (f16), ~0.2% (bf16), ~0.5% (q8_0: 32-value blocks
# sharing one scale); the tiny model's large weights (std 0.2) amplify that about 7x through its layers
# 4 bits: ~6% a weight (16 levels over a block's range)
@pytest.mark.parametrize("outtype, matrix, rel", [("f16", "F16", 5e-3), ("bf16", "BF16", 3e-2), ("q8_0", "Q8_0", 8e-2),
                                                  ("q4_0", "Q4_0", 0.5), ("q4_1", "Q4_1", 0.45)])
def test_outtypes(pair, tmp_path: Path, outtype: str, matrix: str, rel: float) -> None:
    model, tok = pair
    path = write_gguf(model, tok, tmp_path / "tiny.gguf", outtype)
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"  # norms stay F32
    assert types["blk.0.attn_q.weight"] == matrix
    head = "Q8_0" if outtype.startswith("q4") else matrix  # a 4-bit file's embedding and head: 8 bits
    assert types["token_embd.weight"] == types["output.weight"] == head
    # rows of 80 (ffn_down) hold no whole number of 32-value blocks: f16 there, as llama.cpp's converter does
    assert types["blk.0.ffn_down.weight"] == ("F16" if outtype.startswith("q") else matrix)
    back, _ = lmforge.load(path, device="cpu")
    with torch.no_grad():
        expected, got = model(_ids(model)), back(_ids(model))
    error = float((got - expected).norm() / expected.norm())
    assert 0 < error < rel  # rounded (a real conversion happened), and no more than the type's rounding


def test_qwen2_architecture(pair, tmp_path: Path) -> None:
    """Q/K/V biases, and Q/K rows left in HF's order (llama.cpp runs qwen2 with half-split RoPE pairs); transformers'
    GGUF loader reads the file to the same logits."""
    tf = pytest.importorskip("transformers")
    _, tok = pair
    torch.manual_seed(0)
    config = lmforge.ModelConfig.from_preset("tiny-llama", vocab_size=tok.vocab_size, qkv_bias=True,
                                             tie_embeddings=True, init_std=0.2)
    model = lmforge.Transformer(config).eval()
    with torch.no_grad():
        for block in model.layers:
            block.attn.qkv.bias.normal_()  # biases away from their zero init
    path = write_gguf(model, tok, tmp_path / "qwen.gguf", "f32")
    reader = GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "qwen2"
    assert "qwen2.attention.head_count_kv" in reader.fields
    assert {"blk.1.attn_q.bias", "blk.1.attn_k.bias", "blk.1.attn_v.bias"} <= {t.name for t in reader.tensors}
    back, _ = lmforge.load(path, device="cpu")
    assert back.config.qkv_bias and back.config.tie_embeddings
    with torch.no_grad():
        torch.testing.assert_close(back(_ids(model)), model(_ids(model)), atol=0, rtol=0)
        ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, attn_implementation="eager")
        assert type(ref).__name__ == "Qwen2ForCausalLM"
        torch.testing.assert_close(ref.eval()(_ids(model)).logits, model(_ids(model)), atol=1e-4, rtol=1e-4)


def test_tied_embeddings_write_no_output_tensor(tmp_path: Path) -> None:
    tok = train_tokenizer(CORPUS, 280)
    config = lmforge.ModelConfig.from_preset("tiny-llama", vocab_size=tok.vocab_size, tie_embeddings=True)
    model = lmforge.Transformer(config).eval()
    path = write_gguf(model, tok, tmp_path / "tied.gguf", "f32")
    assert "output.weight" not in {t.name for t in GGUFReader(path).tensors}
    back, _ = lmforge.load(path, device="cpu")
    assert back.config.tie_embeddings
    with torch.no_grad():
        torch.testing.assert_close(back(_ids(model)), model(_ids(model)), atol=0, rtol=0)


def test_refusals_name_the_problem(pair, tmp_path: Path) -> None:
    model, tok = pair
    gpt2 = lmforge.Transformer(lmforge.ModelConfig.from_preset("tiny-gpt2", vocab_size=tok.vocab_size))
    with pytest.raises(ValueError, match="llama- and qwen2-architecture.*this model is 'gpt2'"):
        write_gguf(gpt2, tok, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="outtype 'q4_k' is not one of f32, f16, bf16, q8_0, q4_0, q4_1"):
        write_gguf(model, tok, tmp_path / "x.gguf", "q4_k")
    with pytest.raises(ValueError, match="holds the tokenizer too"):
        write_gguf(model, None, tmp_path / "x.gguf")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(ValueError, match="dir.gguf: is a folder"):
        write_gguf(model, tok, tmp_path / "dir.gguf")
    word_level = Tokenizer(models.WordLevel({"a": 0, "<eos>": 1}, unk_token="a"))
    with pytest.raises(ValueError, match="needs a byte-level BPE or a SentencePiece-style BPE tokenizer; this one "
                                         "is WordLevel"):
        write_gguf(model, lmforge.Tokenizer(word_level, bos_token=None, eos_token="<eos>"), tmp_path / "x.gguf")
    small = lmforge.Transformer(lmforge.ModelConfig.from_preset("tiny-llama", vocab_size=tok.vocab_size - 1))
    with pytest.raises(ValueError, match=f"{tok.vocab_size} tokens but the model's embedding only"):
        write_gguf(small, tok, tmp_path / "x.gguf")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="afile is a file, not a folder"):
        write_gguf(model, tok, tmp_path / "afile" / "x.gguf")
    with torch.device("meta"):
        empty = lmforge.Transformer(model.config)
    with pytest.raises(ValueError, match="no weights .it is on the meta device"):
        write_gguf(empty, tok, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("x.gguf*")) and not list(tmp_path.glob(".*tmp*"))


def test_a_failed_write_keeps_the_file_there(pair, tmp_path: Path, monkeypatch) -> None:
    model, tok = pair
    path = write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf_module, "quantize", broken)
    with pytest.raises(OSError, match="disk full"):
        write_gguf(model, tok, path, "f16")
    assert path.read_bytes() == before and not list(tmp_path.glob(".*tmp*"))


def test_cli_convert_to_gguf_and_its_errors(pair, tmp_path: Path, capsys) -> None:
    model, tok = pair
    folder = lmforge.save(model, tok, tmp_path / "model")
    run(["convert", str(folder), str(tmp_path / "m.gguf"), "--outtype", "q8_0"])
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'm.gguf'} (")
    assert {t.tensor_type.name for t in GGUFReader(tmp_path / "m.gguf").tensors} == {"F32", "F16", "Q8_0"}
    run(["convert", str(folder), str(tmp_path / "UPPER.GGUF")])  # the suffix in any case means a GGUF file
    assert (tmp_path / "UPPER.GGUF").is_file() and GGUFReader(tmp_path / "UPPER.GGUF").tensors
    for argv, message in (
        (["convert", str(folder), str(tmp_path / "out"), "--outtype", "q8_0"], "--outtype q8_0 is for a .gguf"),
        (["convert", str(folder), str(tmp_path / "o.gguf"), "--dtype", "float16"], "--dtype is for a folder"),
        (["convert", str(folder), str(tmp_path / "o.gguf"), "--outtype", "q4"], "--outtype 'q4' is not one of"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o.gguf").exists() and not (tmp_path / "out").exists()


@needs_smollm2
def test_smollm2_written_like_llama_cpp_writes_it(tmp_path: Path) -> None:
    """GGUF -> lmforge -> GGUF: every llama.* and tokenizer.ggml.* value (vocabulary, merges, token types, the
    'smollm' pre-tokenizer, special ids, chat template) and every tensor name and shape equal the original's."""
    path = tmp_path / "smollm2.q8_0.gguf"
    run(["convert", str(SMOLLM2), str(path), "--outtype", "q8_0"])
    original, ours = GGUFReader(SMOLLM2), GGUFReader(path)
    want = {k: f.contents() for k, f in original.fields.items() if k.split(".")[0] in ("llama", "tokenizer")}
    got = {k: f.contents() for k, f in ours.fields.items() if k.split(".")[0] in ("llama", "tokenizer")}
    assert {k: v for k, v in got.items() if k != "tokenizer.ggml.add_eos_token"} == want
    assert {t.name: list(t.shape) for t in ours.tensors} == {t.name: list(t.shape) for t in original.tensors}
    assert ours.fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0
    model, tok = lmforge.load(path, device="cpu")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True)
    reply = tok.decode(generate(model, [ids], 12, tokenizer=tok)[0])
    assert "Paris" in reply


# ---- reading: LLaMA-2-style SentencePiece vocabularies ('llama' tokenizer model) ------------------------------


def _sentencepiece_gguf(path: Path, add_space_prefix: bool = True, byte_tokens: bool = True
                        ) -> tuple[Path, lmforge.Transformer]:
    """A GGUF laid out like a LLaMA-2 file: <unk> <s> </s>, the 256 <0xNN> byte tokens, then pieces with their
    BPE scores (minus the merge rank), and a tiny random llama of that vocabulary."""
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer_tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    vocab = trainer_tok.get_vocab()
    pieces = sorted(vocab, key=vocab.__getitem__)
    n_bytes = 256 if byte_tokens else 0
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(n_bytes)), *pieces]
    scores = [0.0] * (3 + n_bytes) + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * n_bytes + [1] * len(pieces)
    torch.manual_seed(0)
    model = lmforge.Transformer(lmforge.ModelConfig.from_preset("tiny-llama", vocab_size=len(tokens))).eval()
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"llama.block_count": c.n_layers, "llama.context_length": c.max_seq_len,
                       "llama.embedding_length": c.dim, "llama.feed_forward_length": c.ffn_dim,
                       "llama.attention.head_count": c.n_heads, "llama.attention.head_count_kv": c.n_kv_heads,
                       "llama.attention.layer_norm_rms_epsilon": c.norm_eps, "llama.rope.freq_base": c.rope_theta,
                       "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                       "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
                       "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                       "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
                       "tokenizer.ggml.add_space_prefix": add_space_prefix}.items():
        w.add_key_value(key, value, gguf.GGUFValueType.get_type(value) if key != "tokenizer.ggml.scores"
                        else gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.FLOAT32
                        if key == "tokenizer.ggml.scores" else None)
    state = to_hf({k: v.detach() for k, v in model.state_dict().items()}, "llama", c)
    for name, t in state.items():
        g = gguf_module._gguf_name(name)
        w.add_tensor(g, gguf_module._gguf_data(t, g, gguf.GGMLQuantizationType.F32, c, permute=True))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, model


SPM_TEXTS = ["The cat sat on the mat.", "12:30 in 2024\nnew line\ttab", "你好，世界 🤗 — ünïcode falls back to bytes",
             "two  spaces   inside", "dog"]
# where transformers' reading of a SentencePiece GGUF (Metaspace, prepend "first") and llama.cpp part ways:
# llama.cpp puts its space before every stretch of text, also one that starts with a space or follows a special
SPM_EDGE_TEXTS = [" leading space", "  two leading spaces", "a</s>b <s> c", "<s>The cat", "x<unk>y"]


def _pieces(tok, text: str) -> list[str]:
    return [tok.backend.id_to_token(i) for i in tok.encode(text, add_bos=False)]


def test_sentencepiece_vocabulary_reads_like_transformers(tmp_path: Path) -> None:
    tf = pytest.importorskip("transformers")
    path, model = _sentencepiece_gguf(tmp_path / "spm.gguf")
    loaded, tok = lmforge.load(path, device="cpu")
    ref = tf.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in SPM_TEXTS:
        assert tok.encode(text) == ref.encode(text), text  # bos first: add_bos_token
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == ref.decode(ref.encode(text),
                                                                                   skip_special_tokens=True)
    # llama.cpp's space rule (llama-vocab.cpp: a space before the text and after each special token)
    assert _pieces(tok, " leading")[:2] == ["\u2581", "\u2581"] and _pieces(tok, "dog")[0].startswith("\u2581")
    pieces = _pieces(tok, "a</s>b")
    cut = pieces.index("</s>")
    assert pieces[0].startswith("\u2581") and pieces[cut + 1].startswith("\u2581")
    assert _pieces(tok, "<s>The")[0] == "<s>" and _pieces(tok, "<s>The")[1].startswith("\u2581")
    assert tok.encode("<unk>", add_bos=False) == [0]  # the unknown token is matched whole, like control tokens
    for text in SPM_TEXTS + [" leading space", "  two leading spaces"]:
        assert tok.decode(tok.encode(text, add_bos=False)) == text  # lossless, leading spaces included
    assert tok.decode(tok.encode("a</s>b", add_bos=False)) == "a</s> b"  # as llama.cpp detokenizes it
    assert _pieces(tok, "龍") == ["\u2581", "<0xE9>", "<0xBE>", "<0x8D>"]  # byte fallback
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.add_bos) == ("<s>", "</s>", "<unk>", True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids(model)), model(_ids(model)), atol=0, rtol=0)
    prompt = tok.encode("The cat")
    assert generate(loaded, [prompt], 5, tokenizer=tok) == generate(model, [prompt], 5, tokenizer=tok)


def test_sentencepiece_without_byte_tokens_maps_unknown_characters_to_unk(tmp_path: Path) -> None:
    path, _ = _sentencepiece_gguf(tmp_path / "spm.gguf", byte_tokens=False)
    _, tok = lmforge.load(path, device="cpu")
    ids = tok.encode("cat 龍 dog", add_bos=False)
    assert 0 in ids and tok.decode(ids).startswith("cat") and tok.decode(ids).endswith("dog")  # not dropped


def test_sentencepiece_without_space_prefix(tmp_path: Path) -> None:
    """tokenizer.ggml.add_space_prefix = false: llama.cpp puts no space before the text (transformers' GGUF
    loader ignores the key, so it is not the reference here)."""
    path, _ = _sentencepiece_gguf(tmp_path / "spm.gguf", add_space_prefix=False)
    _, tok = lmforge.load(path, device="cpu")
    pieces = [tok.backend.id_to_token(i) for i in tok.encode("dog cat", add_bos=False)]
    assert not pieces[0].startswith("\u2581") and any(p.startswith("\u2581") for p in pieces[1:])
    assert tok.decode(tok.encode("dog cat", add_bos=False)) == "dog cat"
    assert tok.decode(tok.encode(" dog", add_bos=False)) == " dog"


def _sentencepiece_style_tokenizer(layout: str) -> lmforge.Tokenizer:
    """A LLaMA-2-shaped tokenizer.json: <unk> <s> </s>, the <0xNN> byte tokens, BPE pieces with "\u2581" for
    spaces, byte fallback, <s> added as bos. layout "legacy": the normalizer puts "\u2581" before each stretch of
    text (LLaMA-2's and Mistral's own files, and llama.cpp's rule); "metaspace": a Metaspace pre-tokenizer puts it
    before the first word only (transformers' non-legacy LlamaTokenizer)."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=220, show_progress=False))
    spec = json.loads(trained.to_str())["model"]
    pieces = sorted(spec["vocab"], key=spec["vocab"].__getitem__)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    backend = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m) if isinstance(m, list) else
                                   tuple(m.split(" ")) for m in spec["merges"]], unk_token="<unk>",
                                   byte_fallback=True, fuse_unk=True))
    if layout == "legacy":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    return lmforge.Tokenizer(backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos=True,
                             chat_template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}")


@pytest.mark.parametrize("layout", ["legacy", "metaspace"])
def test_sentencepiece_style_tokenizer_is_written_as_llama_vocabulary(tmp_path: Path, layout: str) -> None:
    """An HF LLaMA-2 / TinyLlama / Mistral-style tokenizer goes out as tokenizer.ggml.model 'llama' with scores,
    byte and control token types, and reads back to the same ids, in lmforge and in transformers. Texts that
    start with a space or follow a special token come back the same only from the legacy layout: llama.cpp
    itself puts a space there, whatever the tokenizer.json says (its own converter has the same limit)."""
    tf = pytest.importorskip("transformers")
    tok = _sentencepiece_style_tokenizer(layout)
    torch.manual_seed(0)
    model = lmforge.Transformer(lmforge.ModelConfig.from_preset("tiny-llama", vocab_size=tok.vocab_size)).eval()
    path = write_gguf(model, tok, tmp_path / "spm.gguf", "f32")
    fields = {k: f.contents() for k, f in GGUFReader(path).fields.items()}
    assert fields["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in fields
    assert fields["tokenizer.ggml.pre"] == "default" and fields["tokenizer.ggml.add_space_prefix"] is True
    types = fields["tokenizer.ggml.token_type"]
    assert types[:4] == [2, 3, 3, 6] and types[258] == 6 and types[259] == 1  # unknown, control, byte, normal
    back, tok2 = lmforge.load(path, device="cpu")
    ref = tf.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in SPM_TEXTS + ["龍 and 🤗 by bytes"]:
        assert tok2.encode(text) == tok.encode(text), text
        assert ref.encode(text) == tok.encode(text), text
        assert tok2.decode(tok2.encode(text, add_bos=False)) == tok.decode(tok.encode(text, add_bos=False))
    for text in SPM_EDGE_TEXTS:
        assert (tok2.encode(text) == tok.encode(text)) == (layout == "legacy"), text
    with torch.no_grad():
        torch.testing.assert_close(back(_ids(model)), model(_ids(model)), atol=0, rtol=0)
    assert tok2.chat_template == tok.chat_template and (tok2.bos_id, tok2.eos_id) == (1, 2)
