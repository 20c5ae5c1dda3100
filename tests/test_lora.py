"""LoRA: unchanged output at init, merge == unmerged, only adapters train (PEFT files: tests/checkpoint)."""

import pytest
import torch

import lmforge
from lmforge.lora import apply_lora, disable_adapters, lora_modules, merge_lora
from tests.fixtures.hf_models import VOCAB, hf_model


def loaded_pair(tmp):
    """(an lmforge model, the transformers model it was loaded from, `tmp`): the same weights."""
    ref = hf_model("llama-gqa")
    ref.save_pretrained(tmp / "hf")
    model, _ = lmforge.load(tmp / "hf", device="cpu")
    return model, ref, tmp


@pytest.fixture()
def pair(tmp_path):
    return loaded_pair(tmp_path)


def random_ids():
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))


def randomize_b(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.normal_(0, 0.05)


def test_init_is_identity_and_merge_matches(pair):
    model, _, _ = pair
    ids = random_ids()
    with torch.no_grad():
        before = model(ids)
        apply_lora(model, r=4, alpha=8, targets=("qkv", "out", "gate_up", "down"))
        assert len(lora_modules(model)) == 4 * model.config.n_layers
        torch.testing.assert_close(model(ids), before, atol=0, rtol=0)
        randomize_b(model)
        adapted = model(ids)
        assert not torch.allclose(adapted, before)
        with disable_adapters(model):
            torch.testing.assert_close(model(ids), before, atol=0, rtol=0)
        merge_lora(model)
        assert not lora_modules(model)
        torch.testing.assert_close(model(ids), adapted, atol=1e-5, rtol=1e-5)


def test_only_adapters_receive_gradients(pair):
    model, _, _ = pair
    apply_lora(model, r=2, alpha=4)
    logits = model(random_ids())
    logits.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_bad_targets(pair):
    model, _, _ = pair
    with pytest.raises(ValueError, match="match no linear layer"):
        apply_lora(model, targets=("nothing",))
