"""model.py's plain pieces against their textbook definitions."""

import pytest
import torch

from lmforge.model import apply_rope


@pytest.mark.parametrize("form", ["plain", "function"])  # model.py's, and kernels' eager autograd.Function
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rope_dim", [8, 4])  # whole head, and partial rotary (half of it)
def test_rope_rotates_each_pair(interleaved, rope_dim, form):
    from lmforge.config import ModelConfig
    from lmforge.kernels.autograd import RoPEFn
    from lmforge.model import rope_tables

    c = ModelConfig(vocab_size=16, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32, max_seq_len=6,
                    rope_fraction=rope_dim / 8, rope_interleaved=interleaved, rope_theta=100.0)
    C, S = rope_tables(c)
    x = torch.randn(2, 6, 3, 8)  # (B, T, heads, head_dim)
    rotate = apply_rope if form == "plain" else lambda *a: RoPEFn.apply(*a, False)
    out = rotate(x, C[:, None], S[:, None], interleaved)
    # textbook: pair (a, b) at position p, frequency i: rotate by the angle p * theta^(-2i / rope_dim)
    half = rope_dim // 2
    angle = torch.arange(6.0)[:, None] * 100.0 ** (-torch.arange(half) * 2 / rope_dim)  # (T, half)
    z = torch.view_as_complex(x[..., :rope_dim].unflatten(-1, (half, 2)).contiguous() if interleaved else
                              torch.stack((x[..., :half], x[..., half:rope_dim]), -1))
    z = z * torch.polar(torch.ones_like(angle), angle)[:, None]  # (B, T, heads, half)
    rotated = torch.view_as_real(z).flatten(-2) if interleaved else torch.view_as_real(z).transpose(-1, -2).flatten(-2)
    torch.testing.assert_close(out[..., :rope_dim], rotated, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[..., rope_dim:], x[..., rope_dim:])
