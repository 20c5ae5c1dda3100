"""LoRA by module replacement: `apply_lora` swaps the targeted `nn.Linear`s for `LoRALinear` (setattr on the
parent), which adds a trainable low-rank update B·A to a frozen base weight. The model classes are untouched.
Adapters are read and written in Hugging Face peft's layout by `lmforge.checkpoint.peft`."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

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
    """The model's adapters by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Puts `new` where submodule `name` is (setattr on its parent)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def lora_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the linear layers that `targets` choose: a layer whose last name part equals a target, or whose
    full name a target matches as a regex (never lm_head). Every target the user names must choose a layer;
    the default list names both MLP kinds (gate_up, up), so there it is enough that some target does."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    chosen: dict[str, None] = {}
    missing = []
    for t in targets:
        try:
            hits = [n for n in linears if n.split(".")[-1] == t or re.fullmatch(t, n)]
        except re.error as e:
            raise ValueError(f"lora.targets: {t!r} is neither a layer name nor a valid regex ({e})") from None
        chosen.update(dict.fromkeys(hits))
        if not hits:
            missing.append(t)
    if missing and (tuple(targets) != DEFAULT_TARGETS or not chosen):
        kinds = dict.fromkeys(n.split(".")[-1] for n in linears)
        raise ValueError(f"lora.targets {missing} match no linear layer of the model; its layers are "
                         f"{', '.join(kinds)} (a regex is matched against full names such as {linears[0]!r})")
    return list(chosen)


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: Sequence[str] = DEFAULT_TARGETS) -> nn.Module:
    """Freezes `model` and replaces every nn.Linear that `targets` choose (`lora_targets`: e.g. "qkv", "out",
    "gate_up", "down"; or a regex matched against the full name) by a LoRALinear. In place."""
    chosen = lora_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        replace_module(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base weight (W += B·A·scaling) and puts the plain nn.Linear back."""
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            m.base.weight += m.delta().to(m.base.weight.dtype)
            replace_module(model, name, m.base)
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
