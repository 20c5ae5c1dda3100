"""Preference alignment on (prompt, chosen, rejected): DPO, IPO, SimPO, ORPO through the same `fit`.

Chosen and rejected answers go through the model in one concatenated batch. The reference model of DPO/IPO
is, with LoRA, the same model with its adapters switched off (no second copy in memory); otherwise a frozen
copy; or log-probs computed once before training (`reference: precomputed`)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.data.labels import IGNORE
from lmforge.lora import disable_adapters, lora_modules
from lmforge.recipes.common import (
    LoRASpec,
    ModelSpec,
    check_batch,
    lora_hooks,
    save_final,
    setup_lora,
    split_batch,
    start_finetune,
    step_batches,
    to_device,
)
from lmforge.train.loop import FitResult, TrainConfig, fit
from lmforge.train.losses import dpo_loss, ipo_loss, orpo_loss, sequence_logprobs, simpo_loss

METHODS = ("dpo", "ipo", "simpo", "orpo")


@dataclass
class PreferenceData:
    """Preference pairs.

    Attributes:
        train: JSONL with prompt, chosen, rejected (strings, or messages lists).
        val: held-out JSONL of the same kind (preference metrics are measured on it).
        max_len: longest prompt + answer in tokens.
        skip_bad_lines: count and skip malformed lines instead of stopping at the first.
    """

    train: str = ""
    val: str | None = None
    max_len: int = 512
    skip_bad_lines: bool = False


@dataclass
class AlignConfig:
    """A preference-alignment run.

    Attributes:
        out_dir: the run folder: checkpoints/, metrics.jsonl, model/ (merged) and adapter/ (LoRA).
        model: the policy to start from (model.init_from: usually an SFT output).
        data: the preference pairs.
        method: dpo, ipo (reference-based), simpo or orpo (reference-free).
        beta: DPO/IPO/SimPO temperature (ORPO: see orpo_lambda).
        label_smoothing: conservative DPO / SimPO: the share of pairs assumed mislabelled.
        nll_weight: DPO/IPO/SimPO: add this x the chosen answer's per-token NLL (RPO, Pang et al. 2024), which
            keeps the chosen answers likely while the rejected ones are pushed down (0 = off).
        simpo_gamma: SimPO's target reward margin.
        orpo_lambda: weight of ORPO's odds-ratio term next to the SFT loss.
        reference: auto (LoRA: adapters disabled; full: a frozen copy), copy, or precomputed (log-probs
            computed once before training).
        lora: LoRA settings (lora.enabled: true for adapters).
        adapter: an existing LoRA adapter folder (PEFT layout) to continue from.
        batch_size: pairs per optimizer step (global).
        micro_batch_size: pairs per forward/backward; 0 = the whole per-process batch.
        eval_batches: validation batches per evaluation.
        train: the optimizer, schedule and loop settings.
    """

    out_dir: str = "runs/align"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: PreferenceData = field(default_factory=PreferenceData)
    method: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    nll_weight: float = 0.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1
    reference: str = "auto"
    lora: LoRASpec = field(default_factory=LoRASpec)
    adapter: str | None = None
    batch_size: int = 8
    micro_batch_size: int = 0
    eval_batches: int = 20
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-5, warmup_steps=5, weight_decay=0.0))

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {', '.join(METHODS)}")
        if self.reference not in ("auto", "copy", "precomputed"):
            raise ValueError(f"reference={self.reference!r} is not one of auto, copy, precomputed")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0 (a negative one trains towards the rejected answers), got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.nll_weight < 0:
            raise ValueError(f"nll_weight must be >= 0, got {self.nll_weight}")
        if self.nll_weight and self.method == "orpo":
            raise ValueError("nll_weight is for dpo, ipo and simpo: ORPO has its own NLL term (orpo_lambda weighs "
                             "the other)")
        check_batch(self.batch_size, self.micro_batch_size, self.eval_batches)


def pair_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed answer log-probs and answer lengths of the chosen (first half) and rejected (second half) rows."""
    logps, counts = sequence_logprobs(model(batch["x"]), batch["y"])
    b = batch["x"].shape[0] // 2
    return logps[:b], logps[b:], counts[:b].clamp_min(1), counts[b:].clamp_min(1)


class PreferenceLoss:
    """loss_fn for `fit`: the chosen method's loss summed over pairs, with reward metrics."""

    def __init__(self, cfg: AlignConfig, reference: Any) -> None:
        self.cfg, self.reference = cfg, reference  # reference(batch) -> (ref_chosen, ref_rejected) or None

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.cfg
        pc, pr, nc, nr = pair_logprobs(model, batch)
        if c.method in ("dpo", "ipo"):
            rc, rr = self.reference(batch)
            if c.method == "dpo":
                loss, wc, wr = dpo_loss(pc, pr, rc, rr, c.beta, c.label_smoothing)
            else:
                loss, wc, wr = ipo_loss(pc / nc, pr / nr, rc / nc, rr / nr, c.beta)
        elif c.method == "simpo":
            loss, wc, wr = simpo_loss(pc / nc, pr / nr, c.beta, c.simpo_gamma, c.label_smoothing)
        else:
            loss, wc, wr = orpo_loss(pc / nc, pr / nr, -pc / nc, c.orpo_lambda)
        if c.nll_weight:
            loss = loss - c.nll_weight * pc / nc
        metrics = {"reward_acc": float((wc > wr).float().sum()), "reward_margin": float((wc - wr).sum()),
                   "logp_chosen": float(pc.detach().sum()), "logp_rejected": float(pr.detach().sum()),
                   "pref_acc": float((pc / nc > pr / nr).float().sum())}
        return loss.sum(), metrics


def make_reference(cfg: AlignConfig, model, dataset, micro: int) -> Any:
    """The reference log-prob function of DPO/IPO, or None for the reference-free methods."""
    if cfg.method in ("simpo", "orpo"):
        return None
    mode = cfg.reference
    if mode == "auto":
        mode = "adapters" if lora_modules(model) else "copy"
    if mode == "adapters":
        def ref(batch):
            with torch.no_grad(), disable_adapters(model):
                pc, pr, _, _ = pair_logprobs(model, batch)
            return pc, pr
        return ref
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    if mode == "copy":
        def ref(batch):
            with torch.no_grad():
                pc, pr, _, _ = pair_logprobs(frozen, batch)
            return pc, pr
        return ref
    # precomputed: every pair's reference log-probs, once, keyed by the pair's rows
    table: dict[bytes, tuple[float, float]] = {}
    with torch.no_grad():
        for batch in dataset.eval_batches(micro):
            batch = to_device(batch, model.device)
            pc, pr, _, _ = pair_logprobs(frozen, batch)
            for key, a, b in zip(_keys(batch), pc.tolist(), pr.tolist()):
                table[key] = (a, b)
    print(f"precomputed reference log-probs for {len(table):,} pairs")

    def ref(batch):
        vals = torch.tensor([table[k] for k in _keys(batch)], device=batch["x"].device)
        return vals[:, 0], vals[:, 1]
    return ref


def _keys(batch: dict) -> list[bytes]:
    """A pair's identity: its chosen and rejected token rows (padding stripped)."""
    x, y = batch["x"].cpu(), batch["y"].cpu()
    b = x.shape[0] // 2
    keys = []
    for i in range(b):
        rows = []
        for r in (i, i + b):
            n = int((y[r] != IGNORE).nonzero().max()) + 1 if (y[r] != IGNORE).any() else x.shape[1]
            rows.append(x[r, :n].numpy().tobytes())
        keys.append(b"|".join(rows))
    return keys


def pair_rows(batch: dict, rows: slice) -> dict:
    """Pairs `rows` of a rank's batch: their chosen rows (first half) then their rejected rows (second half)."""
    half = batch["x"].shape[0] // 2
    pick = [*range(rows.start, rows.stop), *range(half + rows.start, half + rows.stop)]
    out = {k: v[pick] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    out["n"], out["tokens"] = rows.stop - rows.start, int(out.pop("lengths").sum())  # pairs (loss unit); tokens (tokens/s)
    return out


def preference_metrics(model, dataset, loss_fn: PreferenceLoss, micro: int, max_batches: int) -> dict[str, float]:
    """Held-out loss, reward accuracy and margin, chosen/rejected log-probs, and preference accuracy
    (share of pairs where the policy's per-token log-prob of chosen beats rejected), averaged over pairs."""
    sums: dict[str, float] = {}
    n = 0
    for batch in dataset.eval_batches(micro, max_batches):
        batch = to_device(batch, model.device)
        loss, metrics = loss_fn(model, batch)
        for k, v in {"loss": float(loss), **metrics}.items():
            sums[k] = sums.get(k, 0.0) + v
        n += batch["x"].shape[0] // 2
    return {k: v / max(n, 1) for k, v in sums.items()}


def run(cfg: AlignConfig, dist=None) -> FitResult:
    """Aligns the policy, reports held-out preference metrics before/after, writes <out_dir>/model (and adapter/)."""
    from lmforge.data.preference import PreferenceDataset, load_preferences

    out, dist, rank, world, model, tokenizer = start_finetune(cfg, dist, "alignment")

    def dataset(path: str) -> Any:
        pairs, stats = load_preferences(path, tokenizer, max_len=cfg.data.max_len, skip_bad_lines=cfg.data.skip_bad_lines)
        print(f"{path}: {stats}")
        return PreferenceDataset(pairs, tokenizer.pad_id)

    if not cfg.data.train:
        raise ValueError("data.train: give a JSONL file of preference pairs")
    train, val = dataset(cfg.data.train), (dataset(cfg.data.val) if cfg.data.val else None)
    setup_lora(model, cfg, dist)
    micro, accum = split_batch(cfg.batch_size, cfg.micro_batch_size, world)
    reference = make_reference(cfg, model, train if cfg.reference == "precomputed" else None, micro)
    if reference is not None and cfg.reference == "precomputed" and val is not None:
        reference_val = make_reference(cfg, model, val, micro)
    else:
        reference_val = reference
    loss_fn, val_loss_fn = PreferenceLoss(cfg, reference), PreferenceLoss(cfg, reference_val)
    before = {}
    if val is not None and rank == 0:
        with torch.no_grad():
            model.eval()
            before = preference_metrics(model, val, val_loss_fn, micro, cfg.eval_batches)
            model.train()
        print("held-out before: " + ", ".join(f"{k} {v:.4g}" for k, v in before.items()))
    get_batch = step_batches(train, cfg, rank, world, micro, model.device, pair_rows)
    save_model, load_model = lora_hooks(model, tokenizer)
    result = fit(model, get_batch, loss_fn, cfg.train, out,
                 evaluate=(lambda m: preference_metrics(m, val, val_loss_fn, micro, cfg.eval_batches)) if val else None,
                 save_model=save_model, load_model=load_model, grad_accum=accum, dist=dist)
    if before:  # rank 0's
        after = result.last_eval
        print("held-out preference metrics (before -> after):")
        for k in before:
            print(f"  {k:14s} {before[k]:10.4f} -> {after.get(k, math.nan):10.4f}")
        result.last_eval = {**{f"before_{k}": v for k, v in before.items()}, **after}
    save_final(model, tokenizer, out, dist, base_model=cfg.model.init_from)
    return result
