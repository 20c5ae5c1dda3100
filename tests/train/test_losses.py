"""Every loss against a hand computation, with the numbers written out."""

import math

import pytest
import torch

from lmforge.data.labels import IGNORE
from lmforge.train.losses import (
    dpo_loss,
    ipo_loss,
    next_token_loss,
    orpo_loss,
    sequence_logprobs,
    simpo_loss,
)

t = torch.tensor


def test_next_token_loss_by_hand():
    # one sequence, two counted positions, vocab 3; logits [0, 0, ln 2] -> p = [1/4, 1/4, 1/2]
    logits = t([[[0.0, 0.0, math.log(2)], [0.0, 0.0, math.log(2)], [5.0, 1.0, 2.0]]])
    labels = t([[2, 0, IGNORE]])
    loss, n = next_token_loss(logits, labels)
    assert n == 2
    assert float(loss) == pytest.approx(-math.log(0.5) - math.log(0.25))


def test_sequence_logprobs_by_hand():
    logits = t([[[0.0, 0.0], [0.0, math.log(3)]]])  # p = [1/2, 1/2], [1/4, 3/4]
    total, n = sequence_logprobs(logits, t([[0, 1]]))
    assert float(total) == pytest.approx(math.log(0.5) + math.log(0.75)) and int(n) == 2
    total, n = sequence_logprobs(logits, t([[IGNORE, 1]]))
    assert float(total) == pytest.approx(math.log(0.75)) and int(n) == 1


def test_dpo_matches_paper_formula():
    # π_c = -10, π_r = -12, ref_c = -11, ref_r = -11, β = 0.1
    # z = 0.1 * ((-10 + 11) - (-12 + 11)) = 0.1 * 2 = 0.2 ; loss = -log σ(0.2) = log(1 + e^-0.2) = 0.598139
    loss, rc, rr = dpo_loss(t([-10.0]), t([-12.0]), t([-11.0]), t([-11.0]), beta=0.1)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-0.2)))
    assert float(loss) == pytest.approx(0.598139, abs=1e-6)
    assert (float(rc), float(rr)) == pytest.approx((0.1, -0.1))
    # label smoothing ε = 0.1: 0.9 * log(1 + e^-0.2) + 0.1 * log(1 + e^0.2) = 0.6181
    loss, _, _ = dpo_loss(t([-10.0]), t([-12.0]), t([-11.0]), t([-11.0]), beta=0.1, label_smoothing=0.1)
    assert float(loss) == pytest.approx(0.9 * math.log(1 + math.exp(-0.2)) + 0.1 * math.log(1 + math.exp(0.2)))


def test_dpo_at_step_zero_is_log2_and_rewards_zero():
    pol = t([-3.0, -7.5]), t([-4.0, -2.0])
    loss, rc, rr = dpo_loss(*pol, *pol, beta=0.5)
    assert torch.allclose(loss, torch.full((2,), math.log(2)))
    assert torch.equal(rc, torch.zeros(2)) and torch.equal(rr, torch.zeros(2))


def test_ipo_by_hand():
    # h = (-1 - -1.5) - (-2 - -1.8) = 0.5 + 0.2 = 0.7 ; β = 0.25 -> target 1/(2β) = 2 ; loss = (0.7 - 2)^2 = 1.69
    loss, _, _ = ipo_loss(t([-1.0]), t([-2.0]), t([-1.5]), t([-1.8]), beta=0.25)
    assert float(loss) == pytest.approx(1.69)


def test_simpo_by_hand():
    # β = 2, γ = 0.5, avg_c = -0.5, avg_r = -1.0 -> z = -1 + 2 - 0.5 = 0.5 ; loss = log(1 + e^-0.5) = 0.474077
    loss, rc, rr = simpo_loss(t([-0.5]), t([-1.0]), beta=2.0, gamma=0.5)
    assert float(loss) == pytest.approx(0.474077, abs=1e-6)
    assert (float(rc), float(rr)) == pytest.approx((-1.0, -2.0))


def test_orpo_matches_paper_formula():
    # P_c = e^-0.5 = 0.606531, odds_c = 0.606531 / 0.393469 = 1.541494, log odds_c = 0.432752
    # P_r = e^-1 = 0.367879, odds_r = 0.367879 / 0.632121 = 0.581977, log odds_r = -0.541325
    # log OR = 0.974077 ; L_OR = -log σ(0.974077) = 0.320300 ; L = nll 0.5 + λ 0.1 * 0.320300 = 0.532030
    loss, lc, lr = orpo_loss(t([-0.5]), t([-1.0]), nll_chosen=t([0.5]), lam=0.1)
    assert float(loss) == pytest.approx(0.532030, abs=1e-6)
    assert float(lc) == pytest.approx(0.0432752, abs=1e-6) and float(lr) == pytest.approx(-0.0541325, abs=1e-6)


def test_answer_only_logits_give_the_same_loss():
    """SFT's loss with the LM head run at answer positions only equals the full next-token loss."""
    from lmforge.config import ModelConfig
    from lmforge.model import Transformer
    from lmforge.recipes.sft import masked_lm_loss

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny-llama"))
    x = torch.randint(0, 512, (2, 12))
    y = torch.randint(0, 512, (2, 12))
    y[:, :7] = IGNORE
    y[1, 10:] = IGNORE
    full, _ = next_token_loss(model(x), y)
    fast, _ = masked_lm_loss(model, {"x": x, "y": y})
    torch.testing.assert_close(fast, full)
