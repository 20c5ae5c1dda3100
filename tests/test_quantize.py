"""Weight-only int8 / int4 by module swap: each module equals the product with the weight it stands for (a
tight bound), the quantization error is what the format allows, bad settings are named, and SmolLM2 keeps
its answers."""

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.quantize import Int4Linear, Int8Linear, quantize
from tests.fixtures.smollm2 import SMOLLM2, needs_smollm2
from tests.fixtures.tiny import make_tiny


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme, group", [("int8", 0), ("int4", 32), ("int4", 64)])
def test_each_module_is_the_product_with_its_dequantized_weight(scheme, group, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(128, 96)
    q = Int8Linear.from_float(lin.weight, lin.bias) if scheme == "int8" else Int4Linear.from_float(lin.weight, lin.bias, group)
    w = q.dequantized()
    # the format's own error: half a step of the row's (int8) or the group's (int4) grid
    step = (lin.weight.abs().amax(1, keepdim=True) / 127 if scheme == "int8" else
            (lambda g: (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15)(lin.weight.detach().view(96, -1, group))
            .expand(-1, -1, group).reshape(96, 128))
    assert ((w - lin.weight).abs() <= step / 2 + 1e-6).all()
    x = torch.randn(2, 7, 128).to(dtype)
    y = q(x)
    exact = F.linear(x.double(), w.double(), lin.bias.double())
    assert y.dtype == dtype and y.shape == (2, 7, 96)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the activations and the output are rounded
    torch.testing.assert_close(y.double(), exact, atol=tol * exact.abs().max().item(), rtol=0)


def test_int8_widened_in_the_product_as_on_a_gpu():
    """The form CUDA runs (and any dtype the CPU kernels do not take, here float64): the int8 weight widened to
    x's dtype, times the row's scale, or each group's scale folded into the widened weight."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (48, 96), generator=g)
    x = torch.randn(3, 96, generator=g, dtype=torch.float64)
    for scale in (torch.rand(48, 1, generator=g) + 0.01, torch.rand(48, 3, generator=g) + 0.01):  # a row's, Q8_0's
        lin = Int8Linear(q, scale, torch.randn(48, generator=g))
        want = x @ (lin.q.double().unflatten(-1, (scale.shape[1], -1)) * scale.double()[..., None]).flatten(-2).T
        torch.testing.assert_close(lin(x), want + lin.bias.double(), rtol=1e-12, atol=1e-9)


def test_int4_blocks_in_torchs_cuda_kernel_layout():
    """What the int4 modules hand torch's CUDA kernel (tinygemm), checked without a GPU: the same values through
    torch's CPU twin of that kernel (which takes the codes unpacked, with the same scale-and-zero tensor), the
    nibble order unpacked by hand, and the shapes through torch's own checks (meta tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lmforge.quantize import tinygemm_layout

    g = torch.Generator().manual_seed(0)
    for k in (576, 1536, 96):  # 4, 8 and 2 k-tiles of 16 packed together
        lin = Int4Linear(torch.randint(0, 16, (32, k), generator=g), torch.rand(32, k // 32, generator=g) / 10 + 0.01,
                         torch.randn(32, k // 32, generator=g) / 10, None)
        weight, scale_zero, inner = tinygemm_layout(lin)
        assert inner == {576: 4, 1536: 8, 96: 2}[k] and weight.dtype == torch.uint8 and weight.shape == (32, k // 2)
        assert scale_zero.dtype == torch.bfloat16 and scale_zero.shape == (k // 32, 32, 2)
        codes = torch.stack((weight >> 4, weight & 0x0F), dim=-1).flatten(-2)  # high nibble first
        assert torch.equal(codes, lin.codes())
        scale, zero = scale_zero[..., 0].float().T, scale_zero[..., 1].float().T  # (32, k / 32)
        w = ((codes.float() - 8).unflatten(-1, (-1, 32)) * scale[..., None] + zero[..., None]).flatten(-2)
        torch.testing.assert_close(w, lin.dequantized(), atol=0.01, rtol=0.01)  # scales and zeros in bf16
        x = torch.randn(2, k, generator=g).to(torch.bfloat16)
        cpu_twin = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), inner)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, cpu_twin, 32, scale_zero).float()
        want = x.float() @ lin.dequantized().T
        assert (y - want).norm() / want.norm() < 0.01
        with FakeTensorMode():  # torch's shape checks of the CUDA ops, on stand-in CUDA tensors (no GPU needed)
            on_gpu = [torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in (weight, x, scale_zero)]
            packed = torch.ops.aten._convert_weight_to_int4pack(on_gpu[0], inner)
            out = torch.ops.aten._weight_int4pack_mm(on_gpu[1], packed, 32, on_gpu[2])
        assert out.shape == (2, 32) and out.dtype == torch.bfloat16
    assert lin.tinygemm_weight is None  # on CPU the module keeps only its blocks


def test_int4_gpu_kernel_is_checked_before_it_is_used(monkeypatch):
    """The check a layer's tinygemm form passes when it moves to a GPU, run here with torch's CPU twin standing
    in for the CUDA ops: the right layout is taken; a kernel that reads the nibbles the other way round, or
    raises, is refused with a warning that says why, and the layer keeps the dequantized product."""
    from lmforge import quantize as qmod

    cpu_mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    high_first = lambda w: torch.stack((w >> 4, w & 0x0F), dim=-1).flatten(-2)  # noqa: E731
    low_first = lambda w: torch.stack((w & 0x0F, w >> 4), dim=-1).flatten(-2)  # noqa: E731
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm", cpu_mm, raising=False)
    g = torch.Generator().manual_seed(0)
    lin = Int4Linear(torch.randint(0, 16, (32, 128), generator=g), torch.rand(32, 4, generator=g) / 10 + 0.01,
                     torch.randn(32, 4, generator=g) / 10, None)
    for unpack, works in ((high_first, True), (low_first, False)):
        monkeypatch.setattr(torch.ops.aten, "_convert_weight_to_int4pack", lambda w, inner, u=unpack:
                            torch.ops.aten._convert_weight_to_int4pack_for_cpu(u(w).int(), inner), raising=False)
        qmod._TINYGEMM_WARNED.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            weight, scale_zero = qmod._tinygemm(lin)
        assert (weight is not None) == works
        messages = [str(w.message) for w in caught]
        if works:
            assert messages == []
        else:
            assert len(messages) == 1 and re.fullmatch(
                r"quantize: torch's int4 CUDA kernel is \d+\.\d% off the dequantized product \(layer of 32 x 128\); "
                r"int4 layers keep the dequantized product \(correct, slower\)", messages[0])

    def broken(*args):
        raise RuntimeError("_weight_int4pack_mm_cuda is not available for build.")

    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm", broken)
    qmod._TINYGEMM_WARNED.clear()
    with pytest.warns(UserWarning, match="kernel raised _weight_int4pack_mm_cuda is not available for build"):
        assert qmod._tinygemm(lin) == (None, None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # before Ampere: not tried
    assert qmod._tinygemm(lin) == (None, None)


def test_a_model_off_the_cpu_waits_for_no_cpu_kernel_build(monkeypatch):
    """A GPU model (here on the meta device) runs torch's products: quantize builds none of the CPU kernels."""
    from lmforge.kernels import build

    def refuse(*args, **kwargs):
        raise AssertionError("a CPU kernel was built for a model off the CPU")

    monkeypatch.setattr(build, "load", refuse)
    monkeypatch.setattr(build, "prebuild", refuse)
    for scheme in ("int8", "int4"):
        with torch.device("meta"):
            model = make_tiny(128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)
        quantize(model, scheme)
        layers = [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
        assert len(layers) == 9 and not any(m.kernel for m in layers)


def test_quantize_swaps_every_linear_and_refuses_what_it_cannot_do():
    model = make_tiny(128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)
    x = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        want = model(x)
    with pytest.raises(ValueError, match="unknown scheme 'int3'"):
        quantize(model, "int3")
    with pytest.raises(ValueError, match=r"group_size must be one of \(32, 64, 128, 256\), got 48"):
        quantize(model, "int4", group_size=48)
    with pytest.raises(ValueError, match="layers.0.mlp.down has 96 inputs, not a multiple of group_size 64"):
        quantize(model, "int4", group_size=64)
    assert not any(isinstance(m, Int4Linear) for m in model.modules())  # refused before changing anything
    quantize(model, "int8")
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        got = model(x)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8
    torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0)


@pytest.mark.slow  # two SmolLM2 loads and torch's int8/int4 CPU kernels: ~1 min on 2 cores
@needs_smollm2
def test_smollm2_quantized_keeps_its_answers():
    import lmforge
    from lmforge.generate import generate

    model, tok = lmforge.load(SMOLLM2)
    text = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. Paris is the capital of France, "
                                    "and Berlin is the capital of Germany.")])
    with torch.no_grad():
        want = model(text).argmax(-1)
    quantize(model, "int8")
    with torch.no_grad():
        assert (model(text).argmax(-1) == want).float().mean() >= 0.9  # top-1 agreement with the float model
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True)
    assert "Paris" in tok.decode(generate(model, [ids], 8, tokenizer=tok)[0])
    model4, _ = lmforge.load(SMOLLM2)
    quantize(model4, "int4", group_size=32)
    with torch.no_grad():
        assert (model4(text).argmax(-1) == want).float().mean() >= 0.7


def model_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind a model's parameters and buffers (shared ones once)."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_tied_model_holds_its_quantized_table_once(scheme):
    model = make_tiny(128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, tie_embeddings=True)
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        want = model(x)
    emb = model.tok_emb.weight.detach().clone()
    float_bytes = model_bytes(model)
    quantize(model, scheme)
    assert type(model.tok_emb).__name__ == "QuantEmbedding" and model.tok_emb.table is model.lm_head
    torch.testing.assert_close(model.tok_emb(x), model.lm_head.dequantized()[x])  # a lookup = the table's rows
    step = 2 / 127 if scheme == "int8" else 1 / 15  # one quantization step of the row's / group's range
    assert (model.tok_emb(x) - emb[x]).abs().max() <= step * emb.abs().max()
    held = [*model.parameters(), *model.buffers()]
    assert not any(t.shape == emb.shape and t.is_floating_point() for t in held)  # no float table left
    assert model_bytes(model) < 0.4 * float_bytes  # (the tiny model's norms and RoPE tables stay float)
    with torch.no_grad():
        got = model(x)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.7
    assert model.dtype == torch.float32 and model.device.type == "cpu"


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_are_read_as_they_are(kind):
    """Each block's values and fp16 scale (and minimum) decoded without arithmetic: recombined they are
    exactly gguf's own dequantization."""
    from types import SimpleNamespace

    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from gguf.quants import quantize as gguf_quantize

    from lmforge.checkpoint.gguf import _blocks

    kind_type = GGMLQuantizationType[kind]
    w = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)
    raw = gguf_quantize(w, kind_type)
    b = _blocks(SimpleNamespace(tensor_type=kind_type, shape=[96, 48], data=raw))
    assert b.q.shape == (48, 96) and b.scale.shape == (48, 3)
    assert b.q.dtype == (torch.int8 if kind == "Q8_0" else torch.uint8)
    groups = b.q.float().view(48, 3, 32) * b.scale[..., None] + (0 if b.minimum is None else b.minimum[..., None])
    assert np.array_equal(groups.view(48, 96).numpy(), dequantize(raw, kind_type).reshape(48, 96))
    if kind != "Q8_0":  # and the module built from them computes with those values
        q4 = Int4Linear(b.q, b.scale, b.minimum, None)
        torch.testing.assert_close(q4.dequantized(), groups.view(48, 96), atol=1e-6, rtol=0)
        q4h = Int4Linear(b.q, b.scale.half(), b.minimum.half(), None)  # as load_gguf_blocks holds them: exact
        assert q4h.scale.dtype == torch.float16 and torch.equal(q4h.dequantized(), q4.dequantized())


@pytest.mark.slow  # SmolLM2 loaded, then its blocks read: ~30 s on 2 cores
@needs_smollm2
def test_smollm2_runs_on_its_own_q4_1_and_q8_0_blocks():
    import lmforge
    from lmforge.generate import generate
    from lmforge.quantize import load_gguf_blocks

    model, tok = lmforge.load(SMOLLM2)
    text = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. Paris is the capital of France.")])
    with torch.no_grad():
        want = model(text)
    load_gguf_blocks(model, SMOLLM2)
    kinds = [type(m).__name__ for m in model.modules() if isinstance(m, (Int4Linear, Int8Linear))]
    assert kinds.count("Int4Linear") == 4 * 30 and kinds.count("Int8Linear") == 1  # the layers' Q4_1; the head's Q8_0
    assert model.tok_emb.table is model.lm_head  # the tied embedding reads the head's Q8_0 table: held once
    assert all(m.scale.dtype == torch.float16 for m in model.modules() if isinstance(m, (Int4Linear, Int8Linear)))
    held = model_bytes(model)  # the file's blocks with their fp16 scales: ~its size (the norms, RoPE tables besides)
    assert held <= 1.1 * SMOLLM2.stat().st_size, (held, SMOLLM2.stat().st_size)
    with torch.no_grad():
        got = model(text)
    # the same weights; the kernels read x as int16 blocks (a product within ~2e-5 of fp32's): logits to 5e-4 of
    # their range, the same top-1 everywhere
    torch.testing.assert_close(got, want, atol=5e-4 * want.abs().max().item(), rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True)
    assert "Paris" in tok.decode(generate(model, [ids], 8, tokenizer=tok)[0])
