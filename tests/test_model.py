"""The hand-written eager pieces of model.py equal the plain forms that torch.compile runs, values and
gradients, in fp32 and bf16; RoPE equals the textbook rotation of pairs."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import Linear, _RMSNormFn, _SiluMul, apply_rope

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _run(fn, *inputs):
    """fn(*inputs) and the gradients of its inputs for a fixed, non-uniform output gradient."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype))
    return out, [x.grad for x in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_plain_form(dtype):
    g = torch.Generator().manual_seed(0)
    x, w = (torch.randn(3, 5, 32, generator=g) * 3).to(dtype), (torch.randn(32, generator=g) + 1).to(dtype)
    out, grads = _run(lambda x, w: _RMSNormFn.apply(x, w, 1e-6), x, w)
    ref, ref_grads = _run(lambda x, w: F.rms_norm(x.float(), (32,), eps=1e-6).type_as(x) * w, x, w)
    assert out.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(grads, ref_grads, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_plain_form(dtype):
    gate_up = torch.randn(2, 7, 2 * 24, generator=torch.Generator().manual_seed(1)).to(dtype)
    out, grads = _run(_SiluMul.apply, gate_up)
    ref, ref_grads = _run(lambda gu: F.silu(gu.chunk(2, -1)[0]) * gu.chunk(2, -1)[1], gate_up)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(grads, ref_grads, **TOL[dtype])


@pytest.mark.parametrize("plain", [False, True])  # the eager autograd.Function, and the form torch.compile runs
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rope_dim", [8, 4])  # whole head, and partial rotary (half of it)
def test_rope_rotates_each_pair(interleaved, rope_dim, plain, monkeypatch):
    if plain:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    from lmforge.config import ModelConfig
    from lmforge.model import rope_tables

    c = ModelConfig(vocab_size=16, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32, max_seq_len=6,
                    rope_fraction=rope_dim / 8, rope_interleaved=interleaved, rope_theta=100.0)
    C, S = rope_tables(c)
    x = torch.randn(2, 6, 3, 8)  # (B, T, heads, head_dim)
    out = apply_rope(x, C[:, None], S[:, None], interleaved)
    # textbook: pair (a, b) at position p, frequency i: rotate by the angle p * theta^(-2i / rope_dim)
    half = rope_dim // 2
    angle = torch.arange(6.0)[:, None] * 100.0 ** (-torch.arange(half) * 2 / rope_dim)  # (T, half)
    z = torch.view_as_complex(x[..., :rope_dim].unflatten(-1, (half, 2)).contiguous() if interleaved else
                              torch.stack((x[..., :half], x[..., half:rope_dim]), -1))
    z = z * torch.polar(torch.ones_like(angle), angle)[:, None]  # (B, T, heads, half)
    rotated = torch.view_as_real(z).flatten(-2) if interleaved else torch.view_as_real(z).transpose(-1, -2).flatten(-2)
    torch.testing.assert_close(out[..., :rope_dim], rotated, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[..., rope_dim:], x[..., rope_dim:])


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_gradient_matches_plain_form(interleaved, monkeypatch):
    from lmforge.config import ModelConfig
    from lmforge.model import rope_tables

    c = ModelConfig(vocab_size=16, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32, max_seq_len=6,
                    rope_fraction=0.5, rope_interleaved=interleaved)
    C, S = (t[:, None] for t in rope_tables(c))
    x = torch.randn(2, 6, 3, 8)
    out, grads = _run(lambda x: apply_rope(x, C, S, interleaved), x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    ref, ref_grads = _run(lambda x: apply_rope(x, C, S, interleaved), x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grads, ref_grads)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 24), (1, 24), (24,)])
def test_one_row_linear_matches_f_linear(bias, shape):
    """The row-block product used for one fp32 row on CPU (decoding) == F.linear, values and gradients."""
    torch.manual_seed(0)
    layer = Linear(24, 48, bias=bias)
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
    odd = Linear(24, 40)  # rows not divisible into the blocks: F.linear
    torch.testing.assert_close(odd(x.detach()), F.linear(x.detach(), odd.weight, odd.bias))
    strided = Linear(24, 48)  # a weight that is a transposed view (not contiguous): F.linear
    strided.weight = torch.nn.Parameter(torch.randn(24, 48).T)
    torch.testing.assert_close(strided(x.detach()), F.linear(x.detach(), strided.weight, strided.bias))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_many_half_rows_without_half_instructions_run_in_fp32(dtype, monkeypatch):
    """A prompt's bf16/fp16 rows on a CPU that emulates such matmuls: fp32 product, same value as the
    half-precision kernel up to its rounding; with a backward, or few rows, the plain kernel."""
    import lmforge.model as model_mod

    monkeypatch.setitem(model_mod._EMULATED_HALF, dtype, True)
    torch.manual_seed(0)
    layer = Linear(64, 32).to(dtype)
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
