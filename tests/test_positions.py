"""Position encodings: a model without any (`position="none"`) reads no positions — only the causal order of
attention tells tokens apart — and the sinusoidal table is the closed form of "Attention Is All You Need"."""

from __future__ import annotations

import math

import pytest
import torch

import lmforge
from lmforge.config import hf_model_type
from lmforge.model import sinusoidal_table
from tests.fixtures.decoding import stepwise_logits

VOCAB = 64


def _models(n_layers: int, seed: int = 0) -> tuple[lmforge.Transformer, lmforge.Transformer]:
    """A position="none" model and a rope model with the same weights (the two have the same parameters)."""
    config = dict(vocab_size=VOCAB, dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32,
                  init_std=0.3)  # large weights: attention far from uniform, so positions would matter
    torch.manual_seed(seed)
    none = lmforge.Transformer(lmforge.ModelConfig.from_preset("tiny-llama", position="none", **config)).eval()
    rope = lmforge.Transformer(lmforge.ModelConfig.from_preset("tiny-llama", **config)).eval()
    rope.load_state_dict(none.state_dict())
    return none, rope


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


def test_no_positions_builds_runs_and_trains_on_cpu():
    none, _ = _models(n_layers=2)
    assert none.rope_cos.numel() == none.sinusoid.numel() == 0 and none.pos_emb is None
    ids = _ids(10)
    with torch.no_grad():
        logits = none(ids)
    assert logits.shape == (2, 10, VOCAB) and torch.isfinite(logits).all()
    total, n = none.train()(ids[:, :-1], labels=ids[:, 1:])
    (total / n).backward()
    assert int(n) == 18 and all(p.grad is not None and torch.isfinite(p.grad).all() for p in none.parameters())


def test_position_ids_change_nothing_without_positions():
    """Any position ids (here each row's positions shuffled) give the same logits; with RoPE they do not."""
    none, rope = _models(n_layers=2)
    ids = _ids(12)
    shuffled = torch.stack([torch.randperm(12, generator=torch.Generator().manual_seed(s)) for s in (5, 6)])
    with torch.no_grad():
        torch.testing.assert_close(none(ids, position_ids=shuffled), none(ids), atol=0, rtol=0)
        assert (rope(ids, position_ids=shuffled) - rope(ids)).abs().max() > 1e-2


def test_one_layer_without_positions_sees_the_prefix_as_a_set():
    """One attention layer without positions: the last token attends to the earlier ones as an unordered set
    (softmax(q k) v summed over them), so reordering the prefix leaves the last logits unchanged. RoPE gives
    each key its distance, so there the order counts. (With two layers it counts even without positions: the
    first layer's output at position j depends on which tokens came before j.)"""
    none, rope = _models(n_layers=1)
    ids = _ids(9)
    perm = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])  # of the first 8 tokens; the last stays
    reordered = torch.cat([ids[:, perm], ids[:, 8:]], dim=1)
    assert not torch.equal(reordered, ids)
    with torch.no_grad():
        torch.testing.assert_close(none(reordered)[:, -1], none(ids)[:, -1], atol=1e-5, rtol=1e-5)
        assert (rope(reordered)[:, -1] - rope(ids)[:, -1]).abs().max() > 1e-2
        # causal all the same: the logits at 0..k depend only on tokens 0..k
        changed = ids.clone()
        changed[:, 5:] = (changed[:, 5:] + 1) % VOCAB
        torch.testing.assert_close(none(changed)[:, :5], none(ids)[:, :5], atol=0, rtol=0)


def test_no_positions_kv_cache_and_save_round_trip(tmp_path):
    none, _ = _models(n_layers=2)
    ids = _ids(10)
    with torch.no_grad():
        full = none(ids)
    torch.testing.assert_close(stepwise_logits(none, ids, prefill=6, cache_len=16), full, atol=1e-5, rtol=1e-5)

    assert hf_model_type(none.config) == "lmforge"  # no transformers family computes it
    lmforge.save(none, None, tmp_path / "m")
    again, _ = lmforge.load(tmp_path / "m", device="cpu")
    assert again.config.position == "none"
    with torch.no_grad():
        torch.testing.assert_close(again(ids), full, atol=0, rtol=0)


# ---- sinusoidal ------------------------------------------------------------------------------------------


def test_sinusoidal_table_hand_checked_entries():
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)); with d = 8 the
    divisors are 10000^(0, 1/4, 1/2, 3/4) = 1, 10, 100, 1000."""
    t = sinusoidal_table(16, 8)
    assert t.shape == (16, 8) and t.dtype == torch.float32
    assert t[0].tolist() == [0.0, 1.0] * 4  # position 0: sin 0, cos 0
    for (pos, col), value in {
        (1, 0): math.sin(1.0), (1, 1): math.cos(1.0),
        (3, 2): math.sin(0.3), (3, 3): math.cos(0.3),
        (5, 4): math.sin(0.05), (5, 5): math.cos(0.05),
        (7, 6): math.sin(0.007), (7, 7): math.cos(0.007),
        (15, 0): math.sin(15.0), (15, 3): math.cos(1.5),
    }.items():
        assert t[pos, col].item() == pytest.approx(value, abs=1e-6), (pos, col)


@pytest.mark.parametrize("dim", [2, 10, 64])
def test_sinusoidal_table_is_the_closed_form(dim):
    n = 40
    expected = torch.tensor([[(math.sin if j % 2 == 0 else math.cos)(p / 10000 ** ((j - j % 2) / dim))
                              for j in range(dim)] for p in range(n)], dtype=torch.float64)
    torch.testing.assert_close(sinusoidal_table(n, dim).double(), expected, atol=1e-5, rtol=0)


def test_sinusoidal_model_adds_the_table_to_the_embeddings():
    """With no blocks, the model is lm_head(norm(tok_emb + table[position])): check it by hand."""
    config = lmforge.ModelConfig(vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, position="sinusoidal",
                                 max_seq_len=32)
    torch.manual_seed(0)
    model = lmforge.Transformer(config).eval()
    torch.testing.assert_close(model.sinusoid, sinusoidal_table(32, 16), atol=0, rtol=0)
    model.layers = torch.nn.ModuleList()
    ids = _ids(7)
    with torch.no_grad():
        x = model.tok_emb(ids) + sinusoidal_table(32, 16)[:7]
        torch.testing.assert_close(model(ids), model.lm_head(model.norm(x)), atol=1e-6, rtol=1e-6)
        shifted = model(ids, positions=torch.arange(3, 10))
        x = model.tok_emb(ids) + sinusoidal_table(32, 16)[3:10]
        torch.testing.assert_close(shifted, model.lm_head(model.norm(x)), atol=1e-6, rtol=1e-6)
