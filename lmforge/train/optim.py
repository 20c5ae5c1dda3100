"""AdamW with the usual parameter groups, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms, biases and embeddings are left alone."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or id(p) in embeddings else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW, fused (one kernel per parameter group) on CUDA and CPU where every parameter is a float tensor
    on one device type."""
    types = {p.device.type for p in model.parameters() if p.requires_grad}
    fused = len(types) == 1 and types <= {"cuda", "cpu"} and all(
        p.is_floating_point() for p in model.parameters() if p.requires_grad)
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused)


def lr_factor(step: int, schedule: str, warmup: int, total: int, min_ratio: float = 0.1,
              step_size: int = 1000, gamma: float = 0.5) -> float:
    """Multiplier of the peak learning rate at `step`: linear warmup, then cosine (to `min_ratio`),
    constant, or step (x `gamma` every `step_size` steps, the textbook StepLR)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return gamma ** ((step - warmup) // step_size)
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"schedule={schedule!r} is not one of cosine, constant, step")
