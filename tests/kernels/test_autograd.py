"""The hand-written eager pieces of `kernels` equal the plain forms of model.py (which torch.compile runs),
values and gradients, in fp32 and bf16, with and without the fused CPU kernels; the blocked LM-head loss
equals the full logits' loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.data.labels import IGNORE
from lmforge.kernels import build
from lmforge.kernels.autograd import RMSNormFn, RoPEFn, SiluMulFn, linear_cross_entropy
from lmforge.model import LMHeadLoss, apply_rope
from lmforge.train.losses import next_token_loss

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
FUSED = [False] + ([True] if build.kernels_allowed() and build.load("fused") else [])
t = torch.tensor


def _run(fn, *inputs):
    """fn(*inputs) and the gradients of its inputs for a fixed, non-uniform output gradient."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype))
    return out, [x.grad for x in inputs]


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_plain_form(dtype, fused):
    g = torch.Generator().manual_seed(0)
    x, w = (torch.randn(3, 5, 32, generator=g) * 3).to(dtype), (torch.randn(32, generator=g) + 1).to(dtype)
    out, grads = _run(lambda x, w: RMSNormFn.apply(x, w, 1e-6, fused), x, w)
    ref, ref_grads = _run(lambda x, w: F.rms_norm(x.float(), (32,), eps=1e-6).type_as(x) * w, x, w)
    assert out.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(grads, ref_grads, **TOL[dtype])


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_plain_form(dtype, fused):
    gate_up = torch.randn(2, 7, 2 * 24, generator=torch.Generator().manual_seed(1)).to(dtype)
    out, grads = _run(lambda gu: SiluMulFn.apply(gu, fused), gate_up)
    ref, ref_grads = _run(lambda gu: F.silu(gu.chunk(2, -1)[0]) * gu.chunk(2, -1)[1], gate_up)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(grads, ref_grads, **TOL[dtype])


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_gradient_matches_plain_form(interleaved, fused):
    from lmforge.config import ModelConfig
    from lmforge.model import rope_tables

    c = ModelConfig(vocab_size=16, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32, max_seq_len=6,
                    rope_fraction=0.5, rope_interleaved=interleaved)
    C, S = (t[:, None] for t in rope_tables(c))
    x = torch.randn(2, 6, 3, 8)
    out, grads = _run(lambda x: RoPEFn.apply(x, C, S, interleaved, fused), x)
    ref, ref_grads = _run(lambda x: apply_rope(x, C, S, interleaved), x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grads, ref_grads)


@pytest.mark.parametrize("loss_fn", ["plain", "blocked"])
def test_the_lm_head_loss_by_hand(loss_fn):
    # hidden [1, 0] and [0, 1], weight rows [0, 0, ln 2] in column 0 -> logits [0, 0, ln 2] then [0, 0, 0]
    hidden = t([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    weight = t([[0.0, 0.0], [0.0, 0.0], [math.log(2), 0.0]])
    f = LMHeadLoss() if loss_fn == "plain" else linear_cross_entropy
    loss, n = f(hidden, weight, t([2, 0, IGNORE]))
    assert int(n) == 2
    assert float(loss) == pytest.approx(-math.log(0.5) - math.log(1 / 3))


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("rows", [0, 1, 7, 64])
def test_linear_cross_entropy_blocks_equal_the_full_logits(rows, fused):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (rows,), generator=g)
    labels[::3] = IGNORE
    loss, n = linear_cross_entropy(hidden, weight, labels, block_logits=50 * 5, fused=fused)  # blocks of 5 rows
    (loss * 0.5).backward()
    grads = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    ref, ref_n = next_token_loss((hidden @ weight.T)[None], labels[None])
    (ref * 0.5).backward()
    assert int(n) == int(ref_n)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grads, (hidden.grad, weight.grad))
    with torch.no_grad():  # evaluation: no gradients kept, same value
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels, block_logits=50 * 5)[0], ref)
