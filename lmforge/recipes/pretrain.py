"""Pretraining, from scratch or continued: tokens in, next-token loss, `fit`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.data.prepare import prepare
from lmforge.data.pretrain import PackedDataset
from lmforge.recipes.common import (
    ModelSpec,
    build_model,
    check_batch,
    model_hooks,
    save_final,
    split_batch,
    start_run,
    step_batches,
    val_metrics,
)
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train.loop import FitResult, TrainConfig, fit


@dataclass
class PretrainData:
    """Where the tokens come from.

    Attributes:
        sources: raw text to prepare: files, globs or folders of .txt (documents separated by blank lines),
            .jsonl (a "text" field) or .parquet (a "text" column).
        prepared: a folder of token shards; `lmforge prepare` writes one, and a run prepares `sources` into
            <out_dir>/data when this is empty.
        tokenizer: a folder with tokenizer.json; empty = the init_from checkpoint's, else train one on sources.
        vocab_size: vocabulary size of a tokenizer trained here.
        seq_len: tokens per training window.
        val_fraction: share of documents held out for validation.
        skip_bad_lines: count and skip malformed lines instead of stopping at the first.
    """

    sources: list[str] = field(default_factory=list)
    prepared: str | None = None
    tokenizer: str | None = None
    vocab_size: int = 4096
    seq_len: int = 256
    val_fraction: float = 0.01
    skip_bad_lines: bool = False

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"data.seq_len must be >= 1 tokens, got {self.seq_len}")
        if self.vocab_size < 1:
            raise ValueError(f"data.vocab_size must be >= 1, got {self.vocab_size}")


@dataclass
class PretrainConfig:
    """A pretraining run.

    Attributes:
        out_dir: the run folder: checkpoints/, metrics.jsonl, tensorboard/, config.yaml, and model/ at the end.
        model: the model to train (a preset, or init_from a checkpoint for continued pretraining).
        data: the corpus and tokenizer.
        batch_size: sequences per optimizer step (the global batch, across all processes: with N processes
            each reads batch_size / N of them, so the result does not depend on N).
        micro_batch_size: sequences per forward/backward; 0 = the whole batch at once (per process).
        eval_batches: validation batches per evaluation (0 = none).
        train: the optimizer, schedule and loop settings.
    """

    out_dir: str = "runs/pretrain"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: PretrainData = field(default_factory=PretrainData)
    batch_size: int = 8
    micro_batch_size: int = 0
    eval_batches: int = 20
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        check_batch(self.batch_size, self.micro_batch_size, self.eval_batches)
        if self.eval_batches and self.data.val_fraction == 0 and not self.data.prepared:
            raise ValueError(f"eval_batches={self.eval_batches} but data.val_fraction is 0: there will be no "
                             "validation split; set eval_batches 0 (no evaluation) or a val_fraction above 0")


def prepare_tokens(cfg: PretrainConfig, tokenizer: Tokenizer | None, build: bool = True) -> tuple[Tokenizer, Path]:
    """The tokenizer and the prepared token folder of a run (training / preparing what is missing; with
    build=False only finding what another process made)."""
    d, out = cfg.data, Path(cfg.out_dir)
    if d.tokenizer:
        tokenizer = Tokenizer.from_folder(d.tokenizer)
    if d.prepared and not d.sources:
        if tokenizer is None:
            raise ValueError("data.prepared needs data.tokenizer (or model.init_from with a tokenizer)")
        from lmforge.data.prepare import Manifest

        manifest = Manifest.load(d.prepared)
        made_with = manifest.tokenizer_hash
        if cfg.eval_batches and manifest.tokens("val") == 0:
            raise ValueError(f"data.prepared {d.prepared} has no validation split; set eval_batches 0, or prepare "
                             "it again with a val_fraction above 0")
        if made_with != tokenizer.hash():  # its ids mean other tokens (or none) to this tokenizer
            raise ValueError(f"data.prepared {d.prepared} was made with another tokenizer ({made_with[:12]}…), not "
                             f"this run's ({tokenizer.hash()[:12]}…, from {d.tokenizer or cfg.model.init_from}); "
                             "prepare the data again with it")
        return tokenizer, Path(d.prepared)
    if not d.sources:
        raise ValueError("give data.sources (raw text) or data.prepared (a `lmforge prepare` folder)")
    if tokenizer is None and (not build or (cfg.train.resume and (out / "tokenizer" / "tokenizer.json").is_file())):
        tokenizer = Tokenizer.from_folder(out / "tokenizer")  # made by rank 0, or by the run being resumed
    if tokenizer is None:
        print(f"training a {d.vocab_size}-token byte-level BPE tokenizer on {len(d.sources)} source(s)")
        from lmforge.data.documents import iter_texts

        tokenizer = train_tokenizer(iter_texts(d.sources), d.vocab_size)
        tokenizer.save(out / "tokenizer")
    data_dir = Path(d.prepared) if d.prepared else out / "data"
    if not build:
        return tokenizer, data_dir
    prepare(d.sources, tokenizer, data_dir, val_fraction=d.val_fraction, skip_bad_lines=d.skip_bad_lines,
            seed=cfg.train.seed)
    return tokenizer, data_dir


def lm_rows(xy: tuple[torch.Tensor, torch.Tensor], rows: slice) -> dict:
    """Rows of a batch of packed windows: inputs, next-token targets, and the count of predicted tokens."""
    x, y = xy
    return {"x": x[rows], "y": y[rows], "n": y[rows].numel()}


def lm_loss(model, batch) -> tuple[torch.Tensor, dict[str, float]]:
    loss, _ = model(batch["x"], labels=batch["y"])  # LM head + cross-entropy in blocks: no full logits
    return loss, {}


def run(cfg: PretrainConfig, dist=None) -> FitResult:
    """Prepares data (when needed), builds the model, trains, and writes <out_dir>/model. Under torchrun
    (cfg.train.strategy) every process runs this; rank 0 prepares the data, prints and writes."""
    out, dist, rank, world = start_run(cfg, dist)
    model, tokenizer = build_model(cfg.model, None, cfg.data.seq_len, cfg.train.seed, dist) \
        if cfg.model.init_from else (None, None)
    if model is not None and cfg.data.seq_len > model.config.max_seq_len:  # before any corpus is read
        raise ValueError(f"data.seq_len={cfg.data.seq_len} is longer than the context of {cfg.model.init_from} "
                         f"({model.config.max_seq_len} tokens)")
    if rank == 0:
        tokenizer, data_dir = prepare_tokens(cfg, tokenizer)
    if dist is not None:
        dist.barrier()
        if rank != 0:
            tokenizer, data_dir = prepare_tokens(cfg, tokenizer, build=False)  # made by rank 0: only read
    if model is None:
        model, _ = build_model(cfg.model, tokenizer.vocab_size, cfg.data.seq_len, cfg.train.seed, dist)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, the model only {model.config.vocab_size}")
    train = PackedDataset(data_dir, "train", cfg.data.seq_len)
    val = PackedDataset(data_dir, "val", cfg.data.seq_len) if cfg.eval_batches else None
    micro, accum = split_batch(cfg.batch_size, cfg.micro_batch_size, world)
    device = model.device
    if rank == 0:
        print(f"model: {model.num_params():,} parameters; data: {train.n_tokens:,} train tokens "
              f"({len(train):,} windows of {cfg.data.seq_len}); {cfg.train.max_steps} steps of "
              f"{cfg.batch_size} x {cfg.data.seq_len} tokens")
    get_batch = step_batches(train, cfg, rank, world, micro, device, lm_rows)

    # the same validation windows whatever the number of processes; each process runs `micro` rows at a time
    eval_rows, eval_batch = cfg.eval_batches * (cfg.micro_batch_size or cfg.batch_size), micro * world

    def evaluate(m) -> dict[str, float]:
        total, n = 0.0, 0
        for x, y in val.eval_batches(eval_batch, -(-eval_rows // eval_batch), rank=rank, world_size=world):
            loss, k = m(x.to(device), labels=y.to(device))
            total, n = total + float(loss), n + int(k)
        if dist is not None:
            total, n = dist.all_reduce_sum(total), dist.all_reduce_sum(n)
        return val_metrics(total, n)

    save_model, load_model = model_hooks(model, tokenizer)
    result = fit(model, get_batch, lm_loss, cfg.train, out, evaluate=evaluate if val is not None else None,
                 save_model=save_model, load_model=load_model, grad_accum=accum, dist=dist)
    save_final(model, tokenizer, out, dist)
    return result
