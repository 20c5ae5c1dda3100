"""Losses as pure functions on logits / log-probabilities. Each returns a SUM over its units (tokens or
pairs) so that the loop can normalise once over the whole global batch, whatever the micro-batching."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.data.labels import IGNORE
from lmforge.kernels import fused_on, matmul


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of logits (B, T, V) against labels (B, T) already shifted so that labels[:, t]
    is the token after position t; positions labelled IGNORE do not count. Returns (sum, n_tokens), both
    tensors (no host sync, so a compiled loss stays one graph)."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, (labels != IGNORE).sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (hidden @ weight.T) against labels, a block of rows at a time: each block's
    logits become their own gradient in place (softmax minus one-hot), which is multiplied into the
    gradients of hidden and weight at once. The full (N, vocab) logits, their log-softmax and its gradient
    never exist together — the largest tensors of a training step on a big vocabulary."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, rows):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        empty = torch.empty_like if hidden.shape[0] else torch.zeros_like  # no rows: zero gradient
        grad_w = empty(weight, dtype=torch.float32) if want_w else None
        total = hidden.new_zeros((), dtype=torch.float32)
        fused = hidden.device.type == "cpu" and labels.dtype == torch.long and fused_on()
        w = weight.to(hidden.dtype)  # once, not per block (a no-op when the dtypes agree)
        for s in range(0, hidden.shape[0], rows):
            h, y = hidden[s:s + rows], labels[s:s + rows]
            z = matmul(h, w.T).float()  # (rows, V)
            want = grad_h is not None or grad_w is not None
            # the block's loss; z becomes its gradient (fused: one row at a time, in cache)
            total += torch.ops.lmforge.softmax_xent_(z, y, IGNORE).sum() if fused else _block_xent_(z, y, want)
            if not want:
                continue
            g = z.to(hidden.dtype)
            if grad_h is not None:
                matmul(g, w, out=grad_h[s:s + rows])
            if grad_w is not None:  # the first block writes, the others add
                matmul(g.T.to(torch.float32), h.to(torch.float32), out=grad_w, beta=1.0 if s else 0.0)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype),
                None, None)


def _block_xent_(z: torch.Tensor, y: torch.Tensor, want_grad: bool) -> torch.Tensor:
    """Summed cross-entropy of logits z (rows, V) against labels y (rows,); with want_grad, z becomes the
    gradient of that sum in place (softmax minus one-hot, 0 where ignored)."""
    z.sub_(z.amax(-1, keepdim=True)).exp_()  # exp(z - max)
    denom = z.sum(-1, keepdim=True)  # (rows, 1)
    keep = (y != IGNORE)[:, None]  # (rows, 1)
    y = y.clamp_min(0)[:, None]
    total = ((denom.log() - z.gather(-1, y).log()) * keep).sum()  # log-sum-exp - z_label
    if want_grad:
        z.mul_(keep / denom).scatter_add_(-1, y, -keep.to(z.dtype))
    return total


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         block_logits: int = 1 << 23) -> tuple[torch.Tensor, torch.Tensor]:
    """`next_token_loss(hidden @ weight.T, labels)` — the LM head and the loss in one — without holding the
    (N, vocab) logits: hidden (..., dim), weight (vocab, dim), labels (...). Rows go through in blocks of
    about `block_logits` logits. Under torch.compile (which fuses the plain form itself) it is the plain
    form."""
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    n = (labels != IGNORE).sum()
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(hidden.device.type):
        return next_token_loss((hidden @ weight.T)[None], labels[None])[0], n
    rows = max(16, block_logits // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, labels, rows), n


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
