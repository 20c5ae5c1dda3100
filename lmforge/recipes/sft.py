"""Supervised fine-tuning on labelled Q&A, full or LoRA: chat-templated examples, loss on the answers only,
the same `fit` as pretraining. Reports held-out answer accuracy (greedy) before and after."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lmforge.checkpoint import save
from lmforge.data.labels import IGNORE
from lmforge.lora import (
    DEFAULT_TARGETS,
    apply_lora,
    load_adapter,
    lora_modules,
    merge_lora,
    save_adapter,
    set_adapter_state,
    trainable_parameters,
)
from lmforge.recipes.common import ModelSpec, model_hooks, save_final, start_finetune
from lmforge.train.loop import FitResult, TrainConfig, fit


@dataclass
class LoRASpec:
    """Low-rank adapters instead of full fine-tuning.

    Attributes:
        enabled: train LoRA adapters (the base model stays frozen) instead of every weight.
        r: adapter rank.
        alpha: scaling numerator: the update is B·A·alpha/r.
        dropout: dropout on the adapter input.
        targets: linear layers to adapt, by name: qkv, out, gate_up, down (GELU MLPs: up).
    """

    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def __post_init__(self) -> None:
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


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
        from lmforge.recipes.pretrain import check_batch

        check_batch(self.batch_size, self.micro_batch_size, self.eval_batches)


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold().rstrip(".。!！")


def answer_accuracy(model, tokenizer, prompts: list[tuple[list[int], str]], max_new_tokens: int,
                    batch_size: int = 16) -> dict[str, float]:
    """Greedy answers to held-out prompts: exact match (normalised) and 'contains the reference'."""
    from lmforge.generate import generate

    exact = contains = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            outs = generate(model, [p for p, _ in chunk], max_new_tokens=max_new_tokens, tokenizer=tokenizer)
            for (_, ref), out in zip(chunk, outs):
                got = _normalise(tokenizer.decode(out, skip_special_tokens=True))
                exact += got == _normalise(ref)
                contains += _normalise(ref) in got
    model.train(was_training)
    n = max(len(prompts), 1)
    return {"exact_match": exact / n, "contains": contains / n, "n": len(prompts)}


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


def setup_lora(model, cfg: SFTConfig | Any, dist: Any = None) -> None:
    if (cfg.adapter or cfg.lora.enabled) and dist is not None and dist.strategy == "fsdp":
        raise ValueError("LoRA with train.strategy fsdp is not supported (adapters are small: use ddp)")
    if cfg.adapter:
        load_adapter(model, cfg.adapter)
        for m in lora_modules(model).values():
            for p in (m.lora_a, m.lora_b):
                p.requires_grad_(True)
    elif cfg.lora.enabled:
        apply_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
    n_train, n_all = trainable_parameters(model)
    print(f"training {n_train:,} of {n_all:,} parameters ({100 * n_train / n_all:.2f}%)")


def lora_hooks(model, tokenizer):
    """Checkpoints of a LoRA run hold the adapter only (small); otherwise the whole model folder."""
    if not lora_modules(model):
        return model_hooks(model, tokenizer)

    def save_model(folder: Path) -> None:
        save_adapter(model, Path(folder) / "adapter")

    def load_model(folder: Path) -> None:
        set_adapter_state(model, load_file(Path(folder) / "adapter" / "adapter_model.safetensors"))

    return save_model, load_model


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
    from lmforge.recipes.pretrain import split_batch

    micro, accum = split_batch(cfg.batch_size, cfg.micro_batch_size, world)
    device = model.device
    cache: dict[int, dict] = {}

    def get_batch(step: int, i: int) -> dict:
        if step not in cache:
            cache.clear()
            cache[step] = train.batch(step, cfg.batch_size, cfg.train.seed, rank=rank, world_size=world)
        return _micro(cache[step], i, micro, device)

    def evaluate(m) -> dict[str, float]:
        total, n = 0.0, 0
        for b in val.eval_batches(micro, cfg.eval_batches) if val is not None else []:
            b = _to(b, device)
            loss, _ = masked_lm_loss(m, b)
            total, n = total + float(loss), n + int(b["n"])
        loss = total / max(n, 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    save_model, load_model = lora_hooks(model, tokenizer)
    result = fit(model, get_batch, masked_lm_loss, cfg.train, out, evaluate=evaluate if val is not None else None,
                 save_model=save_model, load_model=load_model, grad_accum=accum, dist=dist)
    sharded = dist is not None and dist.strategy == "fsdp"
    if sharded:
        save_final(model, tokenizer, out / "model", dist)
    elif rank == 0:
        after = answer_accuracy(model, tokenizer, prompts, cfg.eval_max_new_tokens) if prompts else {}
        if lora_modules(model):
            save_adapter(model, out / "adapter", base_model=cfg.model.init_from)
            merge_lora(model)
        save(model, tokenizer, out / "model")
        if after:
            print(f"held-out answer accuracy: before exact {before['exact_match']:.1%} / contains "
                  f"{before['contains']:.1%}  ->  after exact {after['exact_match']:.1%} / contains "
                  f"{after['contains']:.1%} (n={after['n']})")
            result.last_eval.update({f"before_{k}": v for k, v in before.items()} |
                                    {f"after_{k}": v for k, v in after.items()})
        print(f"wrote {out / 'model'}" + (f" and {out / 'adapter'}" if (out / "adapter").exists() else ""))
    return result


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _micro(batch: dict, i: int, micro: int, device) -> dict:
    """Rows [i*micro, (i+1)*micro) of a rank's batch, with their own count of labelled tokens."""
    rows = slice(i * micro, (i + 1) * micro)
    out = {k: v[rows] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    out["n"] = int((out["y"] != IGNORE).sum())
    out["tokens"] = out["x"].numel()  # positions processed, for the tokens/s figure
    return _to(out, device)
