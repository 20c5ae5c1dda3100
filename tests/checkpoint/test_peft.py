"""LoRA adapters in peft's layout, both ways: peft loads ours onto the transformers model, we load peft's."""

import pytest
import torch

import lmforge
from lmforge.checkpoint.peft import load_adapter, save_adapter
from lmforge.lora import apply_lora
from tests.test_lora import loaded_pair, random_ids, randomize_b


@pytest.fixture()
def pair(tmp_path):
    return loaded_pair(tmp_path)


def test_peft_loads_our_adapter(pair):
    from peft import PeftModel

    model, ref, tmp = pair
    apply_lora(model, r=4, alpha=8)
    randomize_b(model)
    save_adapter(model, tmp / "adapter")
    peft_model = PeftModel.from_pretrained(ref, tmp / "adapter").eval()
    ids = random_ids()
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
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), peft_model(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_folder_without_an_adapter_is_refused(pair, tmp_path):
    model, _, _ = pair
    with pytest.raises(lmforge.CheckpointError, match="not a LoRA adapter folder"):
        load_adapter(model, tmp_path)
