"""LoRA by module replacement: `apply_lora` swaps the targeted `nn.Linear`s for `LoRALinear` (setattr on the
parent), which adds a trainable low-rank update B·A to a frozen base weight. The model classes are untouched.

Adapters save in the PEFT layout (`adapter_config.json` + `adapter_model.safetensors`) under the Hugging
Face names of the base model, so `peft` loads them onto the `transformers` model of the same base. A fused
lmforge projection (QKV, gate-up) maps exactly onto PEFT's separate q/k/v (gate/up) adapters: they share A
and split B by rows. Adapters trained by PEFT with different A's load back as one block-diagonal adapter of
rank r x parts — still exact."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.checkpoint.errors import CheckpointError
from lmforge.checkpoint.hf import FAMILIES, _split_sizes, _template, hf_names
from lmforge.config import hf_model_type

DEFAULT_TARGETS = ("qkv", "out", "gate_up", "down", "up")


class LoRALinear(nn.Module):
    """base(x) + scaling · B(A(dropout(x))) with base frozen; B starts at zero, so the output is unchanged."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialise A
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False

    @property
    def weight(self) -> torch.Tensor:  # the (frozen) base weight, for code that reads .weight
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base(x)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in): 2-D so that y below is a tensor of its own, not a view
        y = self.base(x2)  # (N, out)
        xa = F.linear(self.dropout(x2), self.lora_a)  # (N, r)
        # y += scaling * xa @ B^T in one kernel, in place (no scale, add or copy passes over the output; the
        # base matmul's backward does not need its output)
        y.addmm_(xa, self.lora_b.t(), alpha=self.scaling)
        return y.view(*x.shape[:-1], y.shape[-1])

    def delta(self) -> torch.Tensor:
        """The update B·A·scaling, shaped like the base weight (out, in)."""
        return (self.lora_b @ self.lora_a) * self.scaling


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: Sequence[str] = DEFAULT_TARGETS) -> nn.Module:
    """Freezes `model` and replaces every nn.Linear whose name ends with one of `targets` (e.g. "qkv",
    "out", "gate_up", "down"; or a regex matched against the full name) by a LoRALinear. In place."""
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"
              and any(name.split(".")[-1] == t or re.fullmatch(t, name) for t in targets)]
    if not chosen:
        raise ValueError(f"LoRA targets {list(targets)} match no linear layer of the model")
    for name in chosen:
        _replace(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base weight (W += B·A·scaling) and puts the plain nn.Linear back."""
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            m.base.weight += m.delta().to(m.base.weight.dtype)
            _replace(model, name, m.base)
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Runs the base model without its adapters (a free reference model for preference training)."""
    mods = list(lora_modules(model).values())
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.disabled = b


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


# ---- PEFT layout -------------------------------------------------------------------------------------------

_PEFT_PREFIX = "base_model.model."


def _hf_modules(model: nn.Module, name: str, out_features: int) -> tuple[list[str], list[int]]:
    """HF module names (without .weight) of lmforge linear `name`, and the row sizes they split into."""
    c = model.config
    family = FAMILIES[hf_model_type(c)]
    template, _ = _template(f"{name}.weight")
    if template in family.to_hf:
        raise NotImplementedError(f"LoRA adapters in the PEFT layout are not supported for the "
                                  f"{hf_model_type(c)} family; merge_lora and save the model instead")
    names = [n.removesuffix(".weight") for n in hf_names(f"{name}.weight", family)]
    return names, (_split_sizes(template, c, len(names)) if len(names) > 1 else [out_features])


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's names (A shared by the parts of a fused projection, B split)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model).items():
        hf, sizes = _hf_modules(model, name, m.base.out_features)
        for hf_name, b in zip(hf, m.lora_b.detach().split(sizes, dim=0)):
            tensors[f"{_PEFT_PREFIX}{hf_name}.lora_A.weight"] = m.lora_a.detach().cpu().clone()
            tensors[f"{_PEFT_PREFIX}{hf_name}.lora_B.weight"] = b.cpu().contiguous()
    return tensors


def set_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copies tensors written by `adapter_state` back into the model's existing adapters (exact resume)."""
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            hf, _ = _hf_modules(model, name, m.base.out_features)
            m.lora_a.copy_(tensors[f"{_PEFT_PREFIX}{hf[0]}.lora_A.weight"])
            m.lora_b.copy_(torch.cat([tensors[f"{_PEFT_PREFIX}{h}.lora_B.weight"] for h in hf], dim=0))


def save_adapter(model: nn.Module, folder: str | os.PathLike, base_model: str | None = None) -> Path:
    """Writes adapter_config.json + adapter_model.safetensors in the PEFT layout (HF module names). Atomic."""
    from lmforge.checkpoint import atomic_folder

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
        keys = [f"{_PEFT_PREFIX}{h}.lora_{ab}.weight" for h in hf for ab in "AB"]
        present = [k in tensors for k in keys]
        if not any(present):
            continue
        if not all(present):
            missing = [k for k, p in zip(keys, present) if not p]
            raise CheckpointError(f"{folder}: adapter for {name} is incomplete, missing {missing[0]}")
        a_parts = [tensors[f"{_PEFT_PREFIX}{h}.lora_A.weight"] for h in hf]
        b_parts = [tensors[f"{_PEFT_PREFIX}{h}.lora_B.weight"] for h in hf]
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
        _replace(model, name, lora)
        used.update(keys)
    extra = sorted(set(tensors) - used)
    if extra:
        raise CheckpointError(f"{folder}: adapter tensors match no layer of this model, e.g. {extra[0]}")
    if not used:
        raise CheckpointError(f"{folder}: the adapter matches no layer of this model")
    return model
