"""What every recipe shares: the model to start from, the run folder, the save/load hooks of `fit`."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from lmforge.checkpoint import load, load_weights, save, write_model_folder
from lmforge.config import ConfigError, ModelConfig
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


def init_run_distributed(cfg: Any, dist: Any = None) -> Any:
    """The `Dist` of this process for recipe config `cfg` (its train.strategy, train.dist_timeout and
    model.device), or None for one process; `dist` when the caller made one already."""
    from lmforge.train.distributed import init_distributed

    if dist is not None:
        return dist
    return init_distributed(cfg.train.strategy, cfg.train.dist_timeout, cfg.model.device)


def start_finetune(cfg: Any, dist: Any, stage: str) -> tuple[Path, Any, int, int, Transformer, Any]:
    """The shared start of SFT and alignment: process group, run config, the model and tokenizer loaded from
    `model.init_from`. Returns (out_dir, dist, rank, world_size, model, tokenizer)."""
    out = Path(cfg.out_dir)
    dist = init_run_distributed(cfg, dist)
    rank, world = (dist.rank, dist.world_size) if dist else (0, 1)
    if rank == 0:
        write_run_config(out, cfg)
    if not cfg.model.init_from:
        raise ValueError(f"model.init_from: {stage} starts from a checkpoint (HF folder, run output, .gguf)")
    model, tokenizer = build_model(cfg.model, seed=cfg.train.seed, dist=dist)
    if tokenizer is None:
        raise ValueError(f"{cfg.model.init_from}: no tokenizer found next to the model")
    return out, dist, rank, world, model, tokenizer


def save_final(model: Transformer, tokenizer: Any, folder: str | Path, dist: Any = None) -> None:
    """<out_dir>/model at the end of a run: written by rank 0; under FSDP every process helps gather it."""
    with dist.gathered(model) if dist is not None else nullcontext():
        if dist is None or dist.rank == 0:
            save(model, tokenizer, folder)
            print(f"wrote {folder}")


def write_run_config(out_dir: str | Path, cfg: Any) -> None:
    """The resolved recipe config, as YAML, beside the run's outputs; first of all, a folder that already holds a
    run is refused unless it is resumed (nothing of it is overwritten)."""
    from lmforge.train.loop import check_run_dir

    out = Path(out_dir)
    check_run_dir(out, cfg.train.resume)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "config.yaml", "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False, allow_unicode=True)
