"""Losses as pure functions on logits / log-probabilities. Each returns a SUM over its units (tokens or
pairs) so that the loop can normalise once over the whole global batch, whatever the micro-batching. (The
LM head's own loss, `model(ids, labels=...)`, is `model.LMHeadLoss`, blocked by `kernels.accelerate`.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.data.labels import IGNORE


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of logits (B, T, V) against labels (B, T) already shifted so that labels[:, t]
    is the token after position t; positions labelled IGNORE do not count. Returns (sum, n_tokens), both
    tensors (no host sync, so a compiled loss stays one graph)."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, (labels != IGNORE).sum()


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of log p(label) over counted positions, and the number of counted tokens: (B,), (B,)."""
    mask = labels != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (picked * mask).sum(-1), mask.sum(-1)


# ---- preference losses: per-pair tensors (B,) from per-sequence log-probabilities --------------------------

def dpo_loss(pol_chosen: torch.Tensor, pol_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023, eq. 7): -log σ(β[(log π_c - log ref_c) - (log π_r - log ref_r)]).
    With label_smoothing ε (conservative DPO): -(1-ε) log σ(z) - ε log σ(-z).
    Returns (loss per pair, chosen reward β(log π_c - log ref_c), rejected reward)."""
    chosen_reward = beta * (pol_chosen - ref_chosen)
    rejected_reward = beta * (pol_rejected - ref_rejected)
    z = chosen_reward - rejected_reward
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss, chosen_reward.detach(), rejected_reward.detach()


def ipo_loss(pol_chosen: torch.Tensor, pol_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO (Azar et al. 2023): (h - 1/(2β))² with h = (log π_c - log ref_c) - (log π_r - log ref_r); callers
    pass per-token mean log-probs (as the paper's implementation and TRL do)."""
    chosen_reward, rejected_reward = pol_chosen - ref_chosen, pol_rejected - ref_rejected
    loss = (chosen_reward - rejected_reward - 1 / (2 * beta)) ** 2
    return loss, beta * chosen_reward.detach(), beta * rejected_reward.detach()


def simpo_loss(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024), reference-free: -log σ(β·avg log π_c - β·avg log π_r - γ) on per-token
    mean log-probs. Returns (loss, β·avg_c, β·avg_r)."""
    chosen_reward, rejected_reward = beta * avg_chosen, beta * avg_rejected
    z = chosen_reward - rejected_reward - gamma
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss, chosen_reward.detach(), rejected_reward.detach()


def orpo_loss(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, nll_chosen: torch.Tensor, lam: float = 0.1
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024, eq. 6-7): L_SFT + λ·L_OR, L_OR = -log σ(log odds(y_c) - log odds(y_r)),
    odds(y) = P(y)/(1-P(y)) with P the per-token mean probability: log odds = a - log(1 - e^a) for a = mean
    log-prob. nll_chosen is the chosen answer's per-token mean NLL. Returns (loss, λ·log odds_c, λ·log odds_r)."""
    log_odds_c = avg_chosen - torch.log1p(-torch.exp(avg_chosen).clamp(max=1 - 1e-6))
    log_odds_r = avg_rejected - torch.log1p(-torch.exp(avg_rejected).clamp(max=1 - 1e-6))
    loss = nll_chosen - lam * F.logsigmoid(log_odds_c - log_odds_r)
    return loss, lam * log_odds_c.detach(), lam * log_odds_r.detach()
