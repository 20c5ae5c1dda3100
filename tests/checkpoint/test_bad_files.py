"""Bad checkpoint folders are refused with an error naming the file (and tensor) — never unpickled."""

import json

import pytest
import torch

import lmforge
from lmforge.checkpoint import CheckpointError
from lmforge.config import ModelConfig
from lmforge.model import Transformer


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny-llama"))
    lmforge.save(model, None, tmp_path / "m")
    return tmp_path / "m"


def test_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        lmforge.load(saved, device="cpu")


def test_pickle_disguised_as_safetensors(saved, tmp_path):
    torch.save({"x": torch.ones(3)}, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: not a safetensors file"):
        lmforge.load(saved, device="cpu")


def test_pickle_only_folder_is_refused(saved):
    (saved / "model.safetensors").unlink()
    torch.save({"x": torch.ones(3)}, saved / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin, a pickle: lmforge never unpickles"):
        lmforge.load(saved, device="cpu")


def test_missing_tensor_and_wrong_shape(saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved / "model.safetensors")
    missing = dict(tensors)
    del missing["model.layers.1.mlp.down_proj.weight"]
    save_file(missing, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.down_proj.weight' is missing"):
        lmforge.load(saved, device="cpu")
    wrong = dict(tensors)
    wrong["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(3, 3)
    save_file(wrong, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"o_proj.weight has shape \(3, 3\), the config needs \(64, 64\)"):
        lmforge.load(saved, device="cpu")


def test_config_problems_name_the_file(saved):
    (saved / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match=r"config.json:1: not valid JSON"):
        lmforge.load(saved, device="cpu")
    (saved / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(CheckpointError, match="config.json: model_type 't5' is not supported"):
        lmforge.load(saved, device="cpu")
    with pytest.raises(CheckpointError, match="no such file"):
        lmforge.load(saved / "nope", device="cpu")


def test_failed_save_keeps_the_old_folder(saved, monkeypatch):
    before = (saved / "model.safetensors").read_bytes()
    import lmforge.checkpoint.native as native

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(native, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        lmforge.save(Transformer(ModelConfig.from_preset("tiny-llama")), None, saved)
    assert (saved / "model.safetensors").read_bytes() == before
    assert not list(saved.parent.glob(".m.tmp-*"))


def test_device_dtype_mixup_is_explained():
    """Named where a model is run for a user (generation; the command line), not by the plain forward."""
    from lmforge.generate import generate

    model = Transformer(ModelConfig.from_preset("tiny-llama"))
    model.layers[1].mlp.to(torch.float64)
    with pytest.raises(RuntimeError, match=r"device/dtype mix-up: parameters on cpu/float32 \(\d+\), cpu/float64"):
        generate(model, [0, 0, 0, 0], 1)
    with pytest.raises(TypeError, match="input_ids must hold integer token ids"):
        model(torch.zeros(1, 4))
