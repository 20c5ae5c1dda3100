"""LoRA adapters in Hugging Face peft's layout: `adapter_config.json` + `adapter_model.safetensors`, tensors
named `base_model.model.<HF module>.lora_{A,B}.weight` after the base model's HF names, so `peft` loads ours
onto the `transformers` model of the same base and we load peft's.

A fused lmforge projection (QKV, gate-up) maps exactly onto peft's separate q/k/v (gate/up) adapters: they
share A and split B by rows. Adapters trained by peft with different A's load back as one block-diagonal
adapter of rank r x parts — still exact."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.checkpoint.atomic import atomic_folder
from lmforge.checkpoint.errors import CheckpointError
from lmforge.checkpoint.hf import FAMILIES, hf_names, key_template, split_sizes
from lmforge.config import hf_model_type
from lmforge.lora import LoRALinear, lora_modules, replace_module

_PREFIX = "base_model.model."


def _hf_modules(model: nn.Module, name: str, out_features: int) -> tuple[list[str], list[int]]:
    """HF module names (without .weight) of lmforge linear `name`, and the row sizes they split into."""
    c = model.config
    family = FAMILIES[hf_model_type(c)]
    template, _ = key_template(f"{name}.weight")
    if template in family.to_hf:
        raise NotImplementedError(f"LoRA adapters in the PEFT layout are not supported for the "
                                  f"{hf_model_type(c)} family; merge_lora and save the model instead")
    names = [n.removesuffix(".weight") for n in hf_names(f"{name}.weight", family)]
    return names, (split_sizes(template, c) if len(names) > 1 else [out_features])


def _key(hf_module: str, ab: str) -> str:
    return f"{_PREFIX}{hf_module}.lora_{ab}.weight"


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under peft's names (A shared by the parts of a fused projection, B split)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model).items():
        hf, sizes = _hf_modules(model, name, m.base.out_features)
        for hf_name, b in zip(hf, m.lora_b.detach().split(sizes, dim=0)):
            tensors[_key(hf_name, "A")] = m.lora_a.detach().cpu().clone()
            tensors[_key(hf_name, "B")] = b.cpu().contiguous()
    return tensors


def set_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copies tensors written by `adapter_state` back into the model's existing adapters (exact resume)."""
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            hf, _ = _hf_modules(model, name, m.base.out_features)
            m.lora_a.copy_(tensors[_key(hf[0], "A")])
            m.lora_b.copy_(torch.cat([tensors[_key(h, "B")] for h in hf], dim=0))


def save_adapter(model: nn.Module, folder: str | os.PathLike, base_model: str | None = None) -> Path:
    """Writes adapter_config.json + adapter_model.safetensors in the PEFT layout (HF module names). Atomic."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters to save")
    tensors = adapter_state(model)
    targets = {k.removesuffix(".lora_A.weight").rsplit(".", 1)[-1] for k in tensors if k.endswith("lora_A.weight")}
    first = next(iter(mods.values()))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.r, "lora_alpha": first.alpha,
        "lora_dropout": getattr(first.dropout, "p", 0.0), "target_modules": sorted(targets), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base_model,
    }
    with atomic_folder(folder) as tmp:
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return Path(folder)


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Applies a PEFT-layout LoRA adapter (ours or peft's) to an lmforge model of the same base. In place."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(folder / "adapter_model.safetensors")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: not a LoRA adapter folder ({e})") from None
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
        raise CheckpointError(f"{folder}/adapter_config.json: only plain LoRA adapters are supported")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    for p in model.parameters():
        p.requires_grad_(False)
    used: set[str] = set()
    for name in linears:
        hf, sizes = _hf_modules(model, name, model.get_submodule(name).out_features)
        keys = [_key(h, ab) for h in hf for ab in "AB"]
        present = [k in tensors for k in keys]
        if not any(present):
            continue
        if not all(present):
            missing = [k for k, p in zip(keys, present) if not p]
            raise CheckpointError(f"{folder}: adapter for {name} is incomplete, missing {missing[0]}")
        a_parts = [tensors[_key(h, "A")] for h in hf]
        b_parts = [tensors[_key(h, "B")] for h in hf]
        for h, b, size in zip(hf, b_parts, sizes):
            if b.shape[0] != size:
                raise CheckpointError(f"{folder}: {h}.lora_B has {b.shape[0]} rows, the model needs {size}")
        base = model.get_submodule(name)
        if all(torch.equal(a_parts[0], a) for a in a_parts[1:]):
            a, b = a_parts[0], torch.cat(b_parts, dim=0)  # one shared A: rank r
        else:
            a = torch.cat(a_parts, dim=0)  # (parts * r, in)
            b = torch.block_diag(*b_parts)  # (out, parts * r)
        lora = LoRALinear(base, a.shape[0], alpha * a.shape[0] / r)  # keeps scaling = alpha / r
        with torch.no_grad():
            lora.lora_a.copy_(a)
            lora.lora_b.copy_(b)
        replace_module(model, name, lora)
        used.update(keys)
    extra = sorted(set(tensors) - used)
    if extra:
        raise CheckpointError(f"{folder}: adapter tensors match no layer of this model, e.g. {extra[0]}")
    if not used:
        raise CheckpointError(f"{folder}: the adapter matches no layer of this model")
    return model
