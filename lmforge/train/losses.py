"""Losses as pure functions on logits / log-probabilities. Each returns a SUM over its units (tokens or
pairs) so that the loop can normalise once over the whole global batch, whatever the micro-batching."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # label of a position that does not count (prompt, padding)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of logits (B, T, V) against labels (B, T) already shifted so that labels[:, t]
    is the token after position t; positions labelled IGNORE do not count. Returns (sum, n_tokens)."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((labels != IGNORE).sum())


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of log p(label) over counted positions, and the number of counted tokens: (B,), (B,)."""
    mask = labels != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (picked * mask).sum(-1), mask.sum(-1)
