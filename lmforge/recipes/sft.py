"""Supervised fine-tuning on labelled Q&A, full or LoRA: chat-templated examples, loss on the answers only,
the same `fit` as pretraining. Reports held-out answer accuracy (greedy) before and after."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.data.labels import IGNORE
from lmforge.recipes.common import (
    LoRASpec,
    ModelSpec,
    answer_accuracy,
    check_batch,
    lora_hooks,
    save_final,
    setup_lora,
    split_batch,
    start_finetune,
    step_batches,
    to_device,
    val_metrics,
)
from lmforge.train.loop import FitResult, TrainConfig, fit


@dataclass
class ChatData:
    """Labelled conversations.

    Attributes:
        train: JSONL with prompt/response (optional system) or messages (role/content).
        val: held-out JSONL of the same kind; answer accuracy and validation loss are measured on it.
        max_len: longest example in tokens; longer ones are truncated (counted and reported).
        pack: pack short examples into rows of max_len tokens (masks keep them from attending to each other).
        skip_bad_lines: count and skip malformed lines instead of stopping at the first.
    """

    train: str = ""
    val: str | None = None
    max_len: int = 512
    pack: bool = False
    skip_bad_lines: bool = False

    def __post_init__(self) -> None:
        if self.max_len < 2:
            raise ValueError(f"data.max_len must be >= 2 tokens, got {self.max_len}")


@dataclass
class SFTConfig:
    """A fine-tuning run.

    Attributes:
        out_dir: the run folder: checkpoints/, metrics.jsonl, model/ (merged) and adapter/ (LoRA).
        model: the model to start from (model.init_from: any path lmforge.load accepts).
        data: the labelled conversations.
        lora: LoRA settings (lora.enabled: true for adapters).
        adapter: an existing LoRA adapter folder (PEFT layout) to start from.
        batch_size: examples per optimizer step (global).
        micro_batch_size: examples per forward/backward; 0 = the whole per-process batch.
        eval_batches: validation batches per evaluation.
        eval_max_new_tokens: answer length limit when measuring held-out accuracy (0 = skip accuracy).
        train: the optimizer, schedule and loop settings.
    """

    out_dir: str = "runs/sft"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: ChatData = field(default_factory=ChatData)
    lora: LoRASpec = field(default_factory=LoRASpec)
    adapter: str | None = None
    batch_size: int = 8
    micro_batch_size: int = 0
    eval_batches: int = 20
    eval_max_new_tokens: int = 32
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-4, warmup_steps=5, weight_decay=0.0))

    def __post_init__(self) -> None:
        check_batch(self.batch_size, self.micro_batch_size, self.eval_batches)


def masked_lm_loss(model, batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed cross-entropy over answer tokens; the LM head runs at those positions only."""
    loss, _ = model(batch["x"], mask=batch.get("mask"), position_ids=batch.get("position_ids"),
                    logits_at=batch["y"] != IGNORE, labels=batch["y"])
    return loss, {}


def load_chat_data(cfg, tokenizer, max_len: int, pack: bool, seq_len: int | None = None) -> tuple[Any, Any]:
    """(train dataset, val dataset or None), with truncation / skip counts printed."""
    from lmforge.data.sft import SFTDataset, load_sft

    def one(path: str):
        examples, stats = load_sft(path, tokenizer, max_len=max_len, skip_bad_lines=cfg.skip_bad_lines)
        print(f"{path}: {stats}")
        return SFTDataset(examples, tokenizer.pad_id, seq_len or max_len, pack=pack)

    if not cfg.train:
        raise ValueError("data.train: give a JSONL file of conversations")
    return one(cfg.train), (one(cfg.val) if cfg.val else None)


def run(cfg: SFTConfig, dist=None) -> FitResult:
    """Fine-tunes, reports held-out accuracy before/after, writes <out_dir>/model (and adapter/)."""
    from lmforge.data.sft import eval_prompts

    out, dist, rank, world, model, tokenizer = start_finetune(cfg, dist, "fine-tuning")
    train, val = load_chat_data(cfg.data, tokenizer, cfg.data.max_len, cfg.data.pack)
    prompts = eval_prompts(cfg.data.val, tokenizer) if cfg.data.val and cfg.eval_max_new_tokens else []
    before = answer_accuracy(model, tokenizer, prompts, cfg.eval_max_new_tokens) if prompts and rank == 0 else {}
    if before:
        print(f"held-out answer accuracy before: exact {before['exact_match']:.1%}, contains {before['contains']:.1%}"
              f" (n={before['n']})")
    setup_lora(model, cfg, dist)
    micro, accum = split_batch(cfg.batch_size, cfg.micro_batch_size, world)
    device = model.device
    get_batch = step_batches(train, cfg, rank, world, micro, device, answer_rows)

    def evaluate(m) -> dict[str, float]:
        total, n = 0.0, 0
        for b in val.eval_batches(micro, cfg.eval_batches) if val is not None else []:
            b = to_device(b, device)
            loss, _ = masked_lm_loss(m, b)
            total, n = total + float(loss), n + int(b["n"])
        return val_metrics(total, n)

    save_model, load_model = lora_hooks(model, tokenizer)
    result = fit(model, get_batch, masked_lm_loss, cfg.train, out, evaluate=evaluate if val is not None else None,
                 save_model=save_model, load_model=load_model, grad_accum=accum, dist=dist)
    if rank == 0 and prompts and not (dist is not None and dist.strategy == "fsdp"):  # sharded: no generation
        after = answer_accuracy(model, tokenizer, prompts, cfg.eval_max_new_tokens)
        print(f"held-out answer accuracy: before exact {before['exact_match']:.1%} / contains "
              f"{before['contains']:.1%}  ->  after exact {after['exact_match']:.1%} / contains "
              f"{after['contains']:.1%} (n={after['n']})")
        result.last_eval.update({f"before_{k}": v for k, v in before.items()} |
                                {f"after_{k}": v for k, v in after.items()})
    save_final(model, tokenizer, out, dist, base_model=cfg.model.init_from)
    return result


def answer_rows(batch: dict, rows: slice) -> dict:
    """Rows of a rank's batch of examples, with their own count of labelled tokens."""
    out = {k: v[rows] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    out["n"] = int((out["y"] != IGNORE).sum())
    out["tokens"] = out["x"].numel()  # positions processed, for the tokens/s figure
    return out
