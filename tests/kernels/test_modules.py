"""The modules `accelerate` swaps in: CpuLinear's paths equal F.linear; a swapped model computes what the
plain one does (logits, loss, every gradient), shares its parameters, and `restore` gives the plain one back."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.kernels import accelerate, restore
from lmforge.kernels.cpu import Plan
from lmforge.kernels.modules import FAST, CpuLinear
from lmforge.lora import apply_lora
from lmforge.model import Transformer
from tests.fixtures.tiny import make_tiny


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 24), (1, 24), (24,)])
def test_one_row_linear_matches_f_linear(bias, shape):
    """The row-block product used for one fp32 row on CPU (decoding) == F.linear, values and gradients."""
    torch.manual_seed(0)
    layer = CpuLinear(24, 48, bias=bias)
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    ref_layer = torch.nn.Linear(24, 48, bias=bias)
    ref_layer.load_state_dict(layer.state_dict())
    x_ref = x.detach().clone().requires_grad_(True)
    ref = ref_layer(x_ref)
    assert y.shape == ref.shape == (*shape[:-1], 48)
    torch.testing.assert_close(y, ref)
    y.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, ref_layer.weight.grad)
    odd = CpuLinear(24, 40)  # rows not divisible into the blocks: F.linear
    torch.testing.assert_close(odd(x.detach()), F.linear(x.detach(), odd.weight, odd.bias))
    strided = CpuLinear(24, 48)  # a weight that is a transposed view (not contiguous): F.linear
    strided.weight = torch.nn.Parameter(torch.randn(24, 48).T)
    torch.testing.assert_close(strided(x.detach()), F.linear(x.detach(), strided.weight, strided.bias))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_many_half_rows_without_half_instructions_run_in_fp32(dtype, monkeypatch):
    """A prompt's bf16/fp16 rows on a CPU that emulates such matmuls: fp32 product, same value as the
    half-precision kernel up to its rounding; with a backward, or few rows, the plain kernel."""
    torch.manual_seed(0)
    layer = CpuLinear(64, 32).to(dtype)
    layer.plan = Plan(upcast=frozenset({dtype}))
    x = torch.randn(2, 16, 64, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
        exact = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    assert y.dtype == dtype
    assert torch.equal(y, exact.to(dtype))
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias))
    few = x[:, :2]
    assert torch.equal(layer(few), F.linear(few, layer.weight, layer.bias))  # not enough rows to pay off
    grad_x = x.clone().requires_grad_(True)
    assert torch.equal(layer(grad_x), F.linear(grad_x, layer.weight, layer.bias))  # training: unchanged


FAMILIES = {
    "llama": dict(n_kv_heads=2),
    "chatglm": dict(n_kv_heads=1, rope_fraction=0.5, rope_interleaved=True, qkv_bias=True),
    "gpt2": dict(norm="layernorm", position="learned", mlp="gelu", bias=True, qkv_bias=True),
}


def _tiny(family: str) -> Transformer:
    return make_tiny(96, dim=32, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=64, **FAMILIES[family])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_an_accelerated_model_computes_what_the_plain_one_does(family):
    """Logits, the training loss and every gradient, with the paths this machine takes (the fused and
    OpenBLAS kernels where they load), against the plain model: same parameters, swapped back by restore."""
    model = _tiny(family)
    x, y = torch.randint(0, 96, (4, 40)), torch.randint(0, 96, (4, 40))
    y[:, :5] = -100
    with torch.no_grad():
        logits = model(x)
    loss, n = model(x, labels=y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    params = list(model.parameters())
    assert accelerate(model) is model
    assert list(model.parameters()) == params and all(type(m) not in FAST for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-5, rtol=1e-5)
    fast_loss, fast_n = model(x, labels=y)
    torch.testing.assert_close(fast_loss, loss, atol=1e-4, rtol=1e-5)
    assert int(fast_n) == int(n) == 4 * 35
    for a, b in zip(torch.autograd.grad(fast_loss, list(model.parameters())), grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert restore(model) is model and all(type(m) not in FAST.values() for m in model.modules())
    assert list(model.parameters()) == params


def test_accelerate_swaps_by_module_and_keeps_ties_state_and_adapters():
    model = _tiny("llama")
    model.config.tie_embeddings = True
    model.lm_head.weight = model.tok_emb.weight
    apply_lora(model, r=2, targets=["qkv"])
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]  # what an optimizer holds
    lora = model.layers[0].attn.qkv
    accelerate(model, plan=Plan())
    assert [id(p) for p in model.parameters()] == params and list(model.state_dict()) == keys
    assert model.layers[0].attn.qkv is lora and type(lora.base) is CpuLinear  # LoRA's wrapper stays, its base swaps
    assert type(model.lm_head) is CpuLinear and model.lm_head.out_fp32
    assert model.lm_head.weight is model.tok_emb.weight  # the tie holds
    accelerate(model, plan=Plan(fused=True))  # again: the same modules, the new plan
    assert type(model.lm_head) is CpuLinear and model.layers[1].mlp.plan == Plan(fused=True)
    restore(model)
    assert type(lora.base) is nn.Linear and type(model.lm_head) is nn.Linear
    assert "out_fp32" not in model.lm_head.__dict__ and "plan" not in model.layers[1].mlp.__dict__
    assert list(model.state_dict()) == keys


def test_bf16_logits_are_fp32_plain_and_accelerated():
    model = _tiny("llama").bfloat16()
    x = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        plain = model(x)
        fast = accelerate(model, training=False)(x)
    assert plain.dtype == fast.dtype == torch.float32
    torch.testing.assert_close(fast, plain, atol=0.1, rtol=0.02)  # bf16 rounding of the head at most
