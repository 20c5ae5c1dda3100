"""The alignment recipe's loss: the optional NLL term on the chosen answers (RPO)."""

import pytest
import torch

from lmforge.data.labels import IGNORE
from lmforge.recipes.align import AlignConfig, PreferenceLoss, pair_logprobs
from tests.fixtures.tiny import make_tiny


@pytest.mark.parametrize("method", ["dpo", "ipo", "simpo"])
def test_nll_weight_adds_the_chosen_answers_per_token_nll(method):
    model = make_tiny(vocab_size=64)
    torch.manual_seed(0)
    x = torch.randint(0, 64, (4, 9))  # 2 pairs: chosen rows, then rejected rows
    y = torch.roll(x, -1, 1)
    y[:, :4] = IGNORE  # the prompt is not scored
    y[1, 7:] = IGNORE  # answers of different lengths
    batch = {"x": x, "y": y}
    reference = lambda b: tuple(t - 1.0 for t in pair_logprobs(model, b)[:2])  # noqa: E731
    plain, _ = PreferenceLoss(AlignConfig(method=method), reference)(model, batch)
    with_nll, metrics = PreferenceLoss(AlignConfig(method=method, nll_weight=0.5), reference)(model, batch)
    pc, _, nc, _ = pair_logprobs(model, batch)
    torch.testing.assert_close(with_nll, plain + 0.5 * (-pc / nc).sum())
    assert metrics["pref_acc"] == PreferenceLoss(AlignConfig(method=method), reference)(model, batch)[1]["pref_acc"]


def test_nll_weight_must_not_be_negative_nor_given_to_orpo():
    with pytest.raises(ValueError, match="nll_weight must be >= 0, got -1"):
        AlignConfig(nll_weight=-1)
    with pytest.raises(ValueError, match="ORPO has its own NLL term"):
        AlignConfig(method="orpo", nll_weight=1.0)


def test_lora_adapters_start_the_same_every_run():
    """The adapters' random start comes from the run's seed (train.seed), not from whatever the process drew
    before: two runs of one config train the same numbers (and every process of one starts alike)."""
    from lmforge.lora import lora_modules
    from lmforge.recipes.common import setup_lora

    starts = []
    for seed, noise in ((0, 1), (0, 2), (1, 1)):
        model = make_tiny(64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
        torch.manual_seed(noise)
        torch.rand(noise)  # other draws before the adapters
        cfg = AlignConfig()
        cfg.lora.enabled, cfg.train.seed = True, seed
        setup_lora(model, cfg)
        starts.append(torch.cat([m.lora_a.detach().flatten() for m in lora_modules(model).values()]))
    assert torch.equal(starts[0], starts[1]) and not torch.equal(starts[0], starts[2])
