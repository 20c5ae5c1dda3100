"""LoRA: unchanged output at init, merge == unmerged, only adapters train, PEFT round trip both ways."""

import pytest
import torch

import lmforge
from lmforge.lora import apply_lora, disable_adapters, load_adapter, lora_modules, merge_lora, save_adapter
from tests.fixtures.hf_models import VOCAB, hf_model


@pytest.fixture()
def pair(tmp_path):
    ref = hf_model("llama-gqa")
    ref.save_pretrained(tmp_path / "hf")
    model, _ = lmforge.load(tmp_path / "hf", device="cpu")
    return model, ref, tmp_path


def _ids():
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))


def _randomize_b(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.normal_(0, 0.05)


def test_init_is_identity_and_merge_matches(pair):
    model, _, _ = pair
    ids = _ids()
    with torch.no_grad():
        before = model(ids)
        apply_lora(model, r=4, alpha=8, targets=("qkv", "out", "gate_up", "down"))
        assert len(lora_modules(model)) == 4 * model.config.n_layers
        torch.testing.assert_close(model(ids), before, atol=0, rtol=0)
        _randomize_b(model)
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
    logits = model(_ids())
    logits.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_peft_loads_our_adapter(pair):
    from peft import PeftModel

    model, ref, tmp = pair
    apply_lora(model, r=4, alpha=8)
    _randomize_b(model)
    save_adapter(model, tmp / "adapter")
    peft_model = PeftModel.from_pretrained(ref, tmp / "adapter").eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), peft_model(ids).logits, atol=1e-4, rtol=1e-4)


def test_we_load_a_peft_adapter(pair):
    from peft import LoraConfig, get_peft_model

    model, ref, tmp = pair
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(ref, cfg).eval()  # random A and B, each module its own A
    peft_model.save_pretrained(tmp / "peft")
    load_adapter(model, tmp / "peft")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), peft_model(ids).logits, atol=1e-4, rtol=1e-4)


def test_bad_targets_and_folders(pair, tmp_path):
    model, _, _ = pair
    with pytest.raises(ValueError, match="match no linear layer"):
        apply_lora(model, targets=("nothing",))
    with pytest.raises(lmforge.CheckpointError, match="not a LoRA adapter folder"):
        load_adapter(model, tmp_path)
