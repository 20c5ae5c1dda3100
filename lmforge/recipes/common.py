"""What every recipe shares: the model to start from, the batch options and the batches `fit` reads, LoRA,
the run folder, the save/load hooks of `fit` and the model written at the end."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lmforge.checkpoint import load, load_weights, save, write_model_folder
from lmforge.checkpoint.peft import load_adapter, save_adapter, set_adapter_state
from lmforge.checkpoint.run import open_run
from lmforge.config import ConfigError, ModelConfig
from lmforge.lora import (
    DEFAULT_TARGETS,
    apply_lora,
    lora_modules,
    lora_targets,
    merge_lora,
    trainable_parameters,
)
from lmforge.model import Transformer
from lmforge.utils import resolve_device, resolve_dtype


@dataclass
class ModelSpec:
    """Which model to train.

    Attributes:
        preset: a preset name from lmforge.config.PRESETS (e.g. tiny-llama, smollm2-135m, llama2-7b).
        overrides: ModelConfig fields that replace the preset's (e.g. {dim: 128, n_layers: 4}).
        init_from: continue from a checkpoint instead: any path lmforge.load accepts (HF folder, lmforge run
            output, .gguf file). preset and overrides are then ignored.
        device: auto (cuda:0 when present), cpu, cuda, cuda:1 ...
        dtype: parameter dtype: float32 (train with bf16 autocast on CUDA) or bfloat16.
    """

    preset: str = "tiny-llama"
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    device: str = "auto"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        """A misspelt or impossible model is refused here, when the recipe is read, not after the tokenizer
        and the data were prepared."""
        if self.init_from:
            return
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.overrides) - known)
        if unknown:
            raise ConfigError(f"model.overrides: unknown key(s) {', '.join(unknown)}; ModelConfig fields: "
                              f"{', '.join(sorted(known))}")
        try:
            ModelConfig.from_preset(self.preset, **self.overrides)
        except ConfigError as e:
            raise ConfigError(f"model (preset {self.preset!r}, overrides {self.overrides}): {e}") from None


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


def check_batch(batch_size: int, micro_batch_size: int, eval_batches: int = 0) -> None:
    """The batch options of a run config, checked when it is read (before any data is made)."""
    if eval_batches < 0:
        raise ValueError(f"eval_batches must be >= 0, got {eval_batches}")
    split_batch(batch_size, micro_batch_size)


def split_batch(batch_size: int, micro_batch_size: int, world_size: int = 1) -> tuple[int, int]:
    """(rows per micro-batch, micro-batches per step) for a global batch over `world_size` processes."""
    if batch_size < 1 or micro_batch_size < 0:
        raise ValueError(f"batch_size must be >= 1 and micro_batch_size >= 0 (0: the whole batch), got "
                         f"{batch_size} and {micro_batch_size}")
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {world_size} processes")
    per_rank = batch_size // world_size
    micro = micro_batch_size or per_rank
    if per_rank % micro:
        raise ValueError(f"micro_batch_size {micro} does not divide the per-process batch {per_rank}")
    return micro, per_rank // micro


def build_model(spec: ModelSpec, vocab_size: int | None = None, seq_len: int | None = None,
                seed: int = 0, dist: Any = None) -> tuple[Transformer, Any]:
    """A fresh model from the preset (vocab and context fitted to the tokenizer and data), or a loaded one.
    Returns (model, tokenizer-or-None); only a loaded checkpoint brings a tokenizer. Under torchrun (`dist`)
    each process builds it on its own device (FSDP shards it later, in `fit`)."""
    device = dist.device if dist is not None else resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype)
    if spec.init_from:
        model, tokenizer = load(spec.init_from, device=device, dtype=dtype)
        if vocab_size is not None and vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {vocab_size} tokens but {spec.init_from} only {model.config.vocab_size}")
        return model.train(), tokenizer
    extra: dict[str, Any] = {}
    if vocab_size is not None:
        extra["vocab_size"] = vocab_size
    if seq_len is not None:
        extra["max_seq_len"] = max(seq_len, ModelConfig.from_preset(spec.preset).max_seq_len)
    config = ModelConfig.from_preset(spec.preset, **{**extra, **spec.overrides})
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(config)
    return model.to(dtype=dtype).train(), None


def model_hooks(model: Transformer, tokenizer: Any):
    """`save_model` / `load_model` for fit: a checkpoint's weights are a normal model folder."""
    return (lambda folder: write_model_folder(model, tokenizer, Path(folder)),
            lambda folder: load_weights(model, folder))


def setup_lora(model: Transformer, cfg: Any, dist: Any = None) -> None:
    """Adapters for a fine-tuning config (`cfg.adapter` to continue, or `cfg.lora`); prints what trains."""
    if cfg.adapter:  # (what check_lora checks was checked by start_finetune, before the data was read)
        load_adapter(model, cfg.adapter)
        for m in lora_modules(model).values():
            for p in (m.lora_a, m.lora_b):
                p.requires_grad_(True)
    elif cfg.lora.enabled:
        torch.manual_seed(cfg.train.seed)  # A's random start: the same every run (and on every process)
        apply_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
    n_train, n_all = trainable_parameters(model)
    print(f"training {n_train:,} of {n_all:,} parameters ({100 * n_train / n_all:.2f}%)")


def lora_hooks(model: Transformer, tokenizer: Any):
    """Checkpoints of a LoRA run hold the adapter only (small); otherwise the whole model folder."""
    if not lora_modules(model):
        return model_hooks(model, tokenizer)

    def save_model(folder: Path) -> None:
        save_adapter(model, Path(folder) / "adapter")

    def load_model(folder: Path) -> None:
        set_adapter_state(model, load_file(Path(folder) / "adapter" / "adapter_model.safetensors"))

    return save_model, load_model


def step_batches(dataset: Any, cfg: Any, rank: int, world_size: int, micro: int, device: Any,
                 take: Callable[[Any, slice], dict]) -> Callable[[int, int], dict]:
    """`get_batch(step, i)` for `fit`. This process's share of a step's global batch (`dataset.batch`: drawn from
    the step and cfg.train.seed, so the same whatever the process count) is read once per step; micro-batch i
    is `take(batch, rows)` for its `micro` rows, on `device`."""
    cache: dict[int, Any] = {}

    def get_batch(step: int, i: int) -> dict:
        if step not in cache:
            cache.clear()
            cache[step] = dataset.batch(step, cfg.batch_size, cfg.train.seed, rank=rank, world_size=world_size)
        return to_device(take(cache[step], slice(i * micro, (i + 1) * micro)), device)

    return get_batch


def to_device(batch: dict, device: Any) -> dict:
    """The batch's tensors on `device`; counts and other values as they are."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def val_metrics(total: float, n: int) -> dict[str, float]:
    """Validation loss per token from a summed loss over `n` tokens, and its perplexity."""
    loss = total / max(n, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def _normalise(text: str) -> str:
    """An answer as compared: whitespace runs to one space, case folded, no final full stop."""
    return re.sub(r"\s+", " ", text).strip().casefold().rstrip(".。!！")


def greedy_replies(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int,
                   batch_size: int = 16) -> list[str]:
    """The greedy reply to each prompt (token ids), as text, `batch_size` prompts a generate() call."""
    from lmforge.generate import generate

    replies: list[str] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            outs = generate(model, list(prompts[i:i + batch_size]), max_new_tokens=max_new_tokens, tokenizer=tokenizer)
            replies += [tokenizer.decode(out, skip_special_tokens=True) for out in outs]
    model.train(was_training)
    return replies


def score_answers(replies: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Exact match (normalised) and 'contains the reference' of replies against their references."""
    got, want = [_normalise(r) for r in replies], [_normalise(r) for r in refs]
    n = max(len(want), 1)
    return {"exact_match": sum(g == w for g, w in zip(got, want)) / n,
            "contains": sum(w in g for g, w in zip(got, want)) / n, "n": len(want)}


def answer_accuracy(model, tokenizer, prompts: list[tuple[list[int], str]], max_new_tokens: int,
                    batch_size: int = 16) -> dict[str, float]:
    """Greedy answers to held-out prompts: exact match (normalised) and 'contains the reference'."""
    replies = greedy_replies(model, tokenizer, [p for p, _ in prompts], max_new_tokens, batch_size)
    return score_answers(replies, [ref for _, ref in prompts])


def init_run_distributed(cfg: Any, dist: Any = None) -> Any:
    """The `Dist` of this process for recipe config `cfg` (its train.strategy, train.dist_timeout and
    model.device), or None for one process; `dist` when the caller made one already."""
    from lmforge.train.distributed import init_distributed

    if dist is not None:
        return dist
    return init_distributed(cfg.train.strategy, cfg.train.dist_timeout, cfg.model.device)


def start_run(cfg: Any, dist: Any = None) -> tuple[Path, Any, int, int]:
    """The shared start of every recipe: the process group, then (rank 0) the run folder checked and the config
    written. Returns (out_dir, dist, rank, world_size)."""
    out = Path(cfg.out_dir)
    dist = init_run_distributed(cfg, dist)
    rank, world = (dist.rank, dist.world_size) if dist else (0, 1)
    if rank == 0:
        open_run(out, cfg.train.resume, cfg)
    return out, dist, rank, world


def start_finetune(cfg: Any, dist: Any, stage: str) -> tuple[Path, Any, int, int, Transformer, Any]:
    """The shared start of SFT and alignment: `start_run`, then the model and tokenizer loaded from
    `model.init_from`. Returns (out_dir, dist, rank, world_size, model, tokenizer)."""
    out, dist, rank, world = start_run(cfg, dist)
    if not cfg.model.init_from:
        raise ValueError(f"model.init_from: {stage} starts from a checkpoint (HF folder, run output, .gguf)")
    model, tokenizer = build_model(cfg.model, seed=cfg.train.seed, dist=dist)
    if tokenizer is None:
        raise ValueError(f"{cfg.model.init_from}: no tokenizer found next to the model")
    check_lora(model, cfg, dist)  # before any data is read
    return out, dist, rank, world, model, tokenizer


def check_lora(model: Transformer, cfg: Any, dist: Any = None) -> None:
    """What `setup_lora` will need, checked before the work: the strategy, the adapter folder, the targets."""
    if (cfg.adapter or cfg.lora.enabled) and dist is not None and dist.strategy == "fsdp":
        raise ValueError("LoRA with train.strategy fsdp is not supported (adapters are small: use ddp)")
    if cfg.adapter:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            if not (Path(cfg.adapter) / name).is_file():
                raise ValueError(f"adapter {cfg.adapter}: no {name} there (a LoRA adapter folder, PEFT layout)")
    elif cfg.lora.enabled:
        lora_targets(model, cfg.lora.targets)


def save_final(model: Transformer, tokenizer: Any, out_dir: str | Path, dist: Any = None,
               base_model: str | None = None) -> None:
    """<out_dir>/model at the end of a run: written by rank 0; under FSDP every process helps gather it. A LoRA
    run first writes its adapter to <out_dir>/adapter (PEFT layout, for `base_model`), then merges it in."""
    out = Path(out_dir)
    with dist.gathered(model) if dist is not None else nullcontext():
        if dist is None or dist.rank == 0:
            adapter = bool(lora_modules(model))
            if adapter:
                save_adapter(model, out / "adapter", base_model=base_model)
                merge_lora(model)
            save(model, tokenizer, out / "model")
            print(f"wrote {out / 'model'}" + (f" and {out / 'adapter'}" if adapter else ""))
