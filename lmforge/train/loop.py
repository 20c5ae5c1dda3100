"""The ONE training loop. Every stage (pretrain, SFT, alignment) calls `fit` with its own batches and loss:
forward, backward, optimizer step, zero_grad, LR schedule; plus accumulation, clipping, eval, logging,
atomic checkpoints and exact resume."""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.checkpoint.run import (
    prune_checkpoints,
    resume_checkpoint,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from lmforge.kernels import accelerate
from lmforge.train.distributed import load_optimizer_state
from lmforge.train.metrics import MetricsWriter, Throughput
from lmforge.train.optim import build_optimizer, lr_factor
from lmforge.utils import autocast, progress_bar

Batch = dict[str, Any]
# loss_fn(model, batch) -> (summed loss, metrics to log: name -> summed value). batch["n"] = units it counts.
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainConfig:
    """How to train, shared by every stage.

    Attributes:
        max_steps: optimizer steps to run (each one global batch).
        lr: peak learning rate.
        min_lr_ratio: the cosine schedule ends at lr x min_lr_ratio.
        schedule: cosine (after warmup), constant, or step (x gamma every step_size steps).
        warmup_steps: linear warmup from lr/warmup_steps to lr.
        step_size: steps between decays of the step schedule.
        gamma: decay factor of the step schedule.
        weight_decay: AdamW weight decay, on matrices only (not norms, biases, embeddings).
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        grad_clip: clip the global gradient norm to this (0 = off).
        seed: seeds every RNG; with the step it fixes the data order.
        deterministic: torch.use_deterministic_algorithms(True) (slower, bit-reproducible).
        precision: auto (bf16 autocast on CUDA, fp32 on CPU), bf16, fp16 or fp32.
        compile: wrap the model in torch.compile.
        eval_every: run the evaluation every N steps (0 = only at the end).
        log_every: write metrics every N steps.
        checkpoint_every: write checkpoints/step-N every N steps (0 = only at the end).
        keep_last: keep this many newest checkpoints.
        resume: continue from the newest complete checkpoint in the run folder.
        skip_nonfinite: skip a step whose loss or gradient is not finite instead of stopping.
        progress: show a progress bar.
        stop_at: end this session after this step (0 = run to max_steps), with a checkpoint there;
            `resume` continues later exactly as if never stopped (the schedule still spans max_steps).
        strategy: processes under torchrun: auto (single for one process, else ddp), single, ddp (a whole model
            per process, gradients all-reduced) or fsdp (parameters, gradients and optimizer state sharded).
        dist_timeout: seconds a process waits for the others in a collective before the run stops with an
            error (a dead or hung process then ends the run instead of hanging it).
    """

    max_steps: int = 100
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    warmup_steps: int = 10
    step_size: int = 1000
    gamma: float = 0.5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    deterministic: bool = False
    precision: str = "auto"
    compile: bool = False
    eval_every: int = 0
    log_every: int = 1
    checkpoint_every: int = 0
    keep_last: int = 2
    resume: bool = False
    skip_nonfinite: bool = False
    progress: bool = True
    stop_at: int = 0
    strategy: str = "auto"
    dist_timeout: float = 1800.0

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "constant", "step"):
            raise ValueError(f"train.schedule={self.schedule!r} is not one of cosine, constant, step")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"train.precision={self.precision!r} is not one of auto, bf16, fp16, fp32")
        if self.strategy not in ("auto", "single", "ddp", "fsdp"):
            raise ValueError(f"train.strategy={self.strategy!r} is not one of auto, single, ddp, fsdp")
        if self.dist_timeout <= 0:
            raise ValueError(f"train.dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        for name in ("max_steps", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "stop_at", "warmup_steps", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.lr must be >= 0 and train.min_lr_ratio in [0, 1], got {self.lr} and "
                             f"{self.min_lr_ratio}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"train.beta1 and train.beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")
        if self.schedule == "step" and self.step_size < 1:
            raise ValueError(f"train.step_size must be >= 1, got {self.step_size}")


class NonFiniteError(RuntimeError):
    """The loss or the gradient stopped being a finite number."""


class Stopped(RuntimeError):
    """The run was asked to stop (SIGINT, SIGTERM) and did, after a whole step, with a checkpoint at that step
    when it writes checkpoints: resuming (train.resume) goes on exactly as if it had never stopped."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None) -> None:
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        where = f"; checkpoint {checkpoint}" if checkpoint is not None else " (this run writes no checkpoints)"
        super().__init__(f"stopped by {signal_name} after step {step}{where}")


class StopSignals:
    """Within the block, a first SIGINT or SIGTERM only asks the loop to stop after its current step (SLURM
    and other schedulers send SIGTERM before they take the node); a second aborts at once
    (KeyboardInterrupt), and the checkpoints already written stay usable. Handlers exist only in the main
    thread; elsewhere the block changes nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> StopSignals:
        self.name: str | None = None
        self._before = {}
        if threading.current_thread() is threading.main_thread():
            self._before = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.name is not None:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name
        print(f"\nlmforge: {self.name}: stopping after this step, with a checkpoint (again: stop at once)",
              file=sys.stderr, flush=True)

    def agreed(self, dist: Any) -> bool:
        """Whether to stop now: asked here, or (under torchrun) in any process; all then stop together."""
        asked = self.name is not None
        if dist is not None:
            asked = dist.all_reduce_sum(float(asked)) > 0
            self.name = self.name or ("a signal to another process" if asked else None)
        return asked

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._before.items():
            signal.signal(s, handler)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


# ---- the loop ----------------------------------------------------------------------------------------------

@dataclass
class FitResult:
    step: int
    losses: list[float]
    last_eval: dict[str, float]
    run_dir: Path


def fit(
    model: nn.Module,
    get_batch: Callable[[int, int], Batch],
    loss_fn: LossFn,
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    save_model: Callable[[Path], None] | None = None,
    load_model: Callable[[Path], None] | None = None,
    grad_accum: int = 1,
    dist: Any = None,
) -> FitResult:
    """Trains `model` for `cfg.max_steps` optimizer steps.

    get_batch(step, micro) -> a dict of tensors for micro-batch `micro` of optimizer step `step`, with
      "n": the number of units (tokens, pairs) the loss sums over. It must be a pure function of its
      arguments (and the seed), which is what makes resume exact.
    loss_fn(model, batch) -> (summed loss, {metric: summed value}); the loop divides by the global "n".
    run_dir: where checkpoints/, metrics.jsonl and tensorboard/ go. `fit` writes there as told: open it first
      with `lmforge.checkpoint.run.open_run`, which refuses a folder that holds another run (as every recipe does).
    evaluate(model) -> {name: value}, run every cfg.eval_every steps and at the end.
    save_model(folder) / load_model(folder): write / read the weights of a checkpoint (a model folder).
      Under FSDP, save_model runs on rank 0 inside `dist.gathered(model)`, where the model's state_dict()
      holds the full weights; load_model reads into the plain model, before it is sharded.
    grad_accum: micro-batches per optimizer step (get_batch is called with micro = 0 .. grad_accum - 1).
    dist: an optional `lmforge.train.distributed.Dist`; None = one process. `fit` wraps the model itself
      (DDP, or FSDP which shards `model` in place): pass the plain model. get_batch then returns this
      process's share of the global batch, and the result does not depend on the number of processes.
    """
    run_dir = Path(run_dir)
    is_main = dist is None or dist.rank == 0
    world = dist.world_size if dist is not None else 1
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed, cfg.deterministic)
    if cfg.resume and load_model is None:
        raise ValueError("resume needs load_model to restore the weights")
    # (folder, train state) of the newest checkpoint that loads, its weights loaded into the plain model: whole
    # weights, before DDP copies them or FSDP shards them
    resumed = resume_checkpoint(run_dir, load_model, is_main) if cfg.resume else None
    model = accelerate(model)  # the fast modules (kernels/; built on first use), before DDP/FSDP wraps them
    if dist is not None:
        model = dist.wrap(model)
    device = next(model.parameters()).device
    amp_dtype = _amp_dtype(cfg.precision, device)
    optimizer, schedule = _optimizer(model, cfg)
    start = _restore(*resumed, model, optimizer, schedule, world, is_main) if resumed is not None else 0
    # compile the loss function whole: the model and the loss (the fp32 upcast of the logits, log-softmax)
    # become one graph, so the big (tokens, vocab) intermediates are fused
    step_loss = torch.compile(loss_fn) if cfg.compile else loss_fn
    params = [p for p in model.parameters() if p.requires_grad]
    metrics = MetricsWriter(run_dir if is_main else None, resumed_at=start if resumed is not None else None)

    def checkpoint(step: int) -> None:
        state = {"scheduler": schedule.state_dict(), "rng": rng_state(), "step": step, "data_position": step,
                 "train_config": asdict(cfg), "world_size": world, "strategy": dist.strategy if dist else "single"}
        folder = run_dir / "checkpoints" / f"step-{step}"
        if dist is None:
            write_checkpoint(folder, save_model, {**state, "optimizer": optimizer.state_dict()})
        else:
            dist.save_checkpoint(folder, model, optimizer, save_model, state)  # every process takes part
        if is_main:
            prune_checkpoints(run_dir, cfg.keep_last)

    losses: list[float] = []
    last_eval: dict[str, float] = {}
    bar = progress_bar(total=cfg.max_steps, initial=start, disable=not (cfg.progress and is_main))
    model.train()
    speed = Throughput()
    end = min(cfg.stop_at or cfg.max_steps, cfg.max_steps)
    acc = torch.float32 if device.type == "mps" else torch.float64  # Apple's GPU has no float64
    with StopSignals() as stop:  # SIGINT/SIGTERM: finish the step, checkpoint it, stop
        for step in range(start, end):
            micro = [get_batch(step, i) for i in range(grad_accum)]
            n_total = _global_count(micro, dist)
            # the step's loss, metrics and gradient norm stay on the device until its end: one host sync per step
            # (a sync per micro-batch would leave a GPU idle while the host queues each backward)
            loss_sum: torch.Tensor | float = 0.0
            sums: dict[str, Any] = {}
            for i, batch in enumerate(micro):
                with autocast(device, amp_dtype), (dist.no_sync(model, i < len(micro) - 1) if dist else nullcontext()):
                    loss, values = step_loss(model, batch)
                    # DDP and FSDP average gradients over processes; x world turns that into the global sum
                    (loss * world / n_total).backward()
                loss_sum = loss_sum + loss.detach().to(acc)  # float64: as exact as summing Python floats
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + (v.detach().to(acc) if isinstance(v, torch.Tensor) else v)
                speed.add(int(batch.get("tokens", batch["n"])))
            # the global norm, also over FSDP's sharded gradients (DTensors)
            norm = (torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else
                    torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
            loss_sum, grad_norm, sums = _step_totals(loss_sum, norm, sums, acc, dist)
            skip = _skip_nonfinite(step + 1, loss_sum, grad_norm, cfg.skip_nonfinite)
            if not skip:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            bar.update(1)
            if skip:
                metrics.log({"step": step + 1, "skipped_nonfinite": 1})
            else:
                loss_mean = loss_sum / n_total
                losses.append(loss_mean)
            if not skip and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps):
                tps, lr = speed.per_second() * world, schedule.get_last_lr()[0]
                metrics.log({"step": step + 1, "loss": loss_mean, "lr": lr, "grad_norm": grad_norm,
                             "tokens_per_s": tps, **{k: v / n_total for k, v in sums.items()}})
                # shown at the bar's next refresh: a log file gets a line per interval, not one per step
                bar.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
            stopping = stop.agreed(dist) and step + 1 < end  # every process stops at the same step
            done = step + 1 == end or stopping
            if evaluate is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not done:
                last_eval = _evaluate(model, evaluate, device, amp_dtype)
                metrics.log_eval(step + 1, last_eval)
                stopping = done = stop.agreed(dist)  # a signal during the evaluation: stop at this step
            if save_model is not None and ((cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or done):
                checkpoint(step + 1)
            if stopping:
                bar.close()
                metrics.close()
                raise Stopped(stop.name, step + 1, run_dir / "checkpoints" / f"step-{step + 1}" if save_model else None)
    bar.close()
    if evaluate is not None:
        last_eval = _evaluate(model, evaluate, device, amp_dtype)
        metrics.log_eval(end, last_eval)
    metrics.close()
    return FitResult(end, losses, last_eval, run_dir)


def _amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of train.precision (auto: bf16 on CUDA); None = no autocast."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None,
            "auto": torch.bfloat16 if device.type == "cuda" else None}[precision]


def _optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its learning-rate schedule, as `cfg` says."""
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.schedule, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio,
                                       cfg.step_size, cfg.gamma))
    return optimizer, schedule


def _restore(folder: Path, state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
             schedule: torch.optim.lr_scheduler.LambdaLR, world: int, say: bool) -> int:
    """Optimizer, schedule and RNGs from checkpoint `folder` (the weights are in already); the step to go on from."""
    load_optimizer_state(folder, model, optimizer, state)  # whichever strategy and world size wrote it
    schedule.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    if say:
        written = state.get("world_size", 1)
        print(f"resuming from {folder} (step {state['step']})" + (
            f"; it was written by {written} process(es), this run has {world}: the data position is the "
            "step and each global batch is the same whatever the number of processes, so training goes "
            "on as if unchanged" if written != world else ""))
    return state["step"]


def _global_count(micro: list[Batch], dist: Any) -> float:
    """The units the step's loss sums over, over every process (at least 1: the loss is divided by it)."""
    n_total = float(sum(b["n"] for b in micro))
    if dist is not None:
        n_total = dist.all_reduce_sum(n_total)
    return max(n_total, 1.0)


def _step_totals(loss_sum: Any, norm: torch.Tensor, sums: dict[str, Any], acc: torch.dtype,
                 dist: Any) -> tuple[float, float, dict[str, float]]:
    """The step's loss sum, gradient norm and metric sums as Python floats, in one host sync; the sums are then
    added over the processes, so every process takes the same decision (the norm is global already)."""
    loss_sum, grad_norm, *values = _to_host([loss_sum, norm, *sums.values()], acc)
    sums = dict(zip(sums, values))
    if dist is not None:
        loss_sum = dist.all_reduce_sum(loss_sum)
        sums = {k: dist.all_reduce_sum(v) for k, v in sums.items()}
    return loss_sum, grad_norm, sums


def _skip_nonfinite(step: int, loss_sum: float, grad_norm: float, skip: bool) -> bool:
    """Whether step `step` (1-based) is to be skipped: its loss or gradient norm is not finite, and `skip` says to
    go on; without `skip` that stops the run."""
    problem = (f"loss is {loss_sum} (not finite)" if not math.isfinite(loss_sum) else
               f"gradient norm is {grad_norm}" if not math.isfinite(grad_norm) else None)
    if problem is not None and not skip:
        raise NonFiniteError(f"step {step}: {problem}; stopping without writing a checkpoint. Lower "
                             "train.lr, or set train.skip_nonfinite")
    return problem is not None


def _evaluate(model: nn.Module, evaluate: Callable[[nn.Module], dict[str, float]], device: torch.device,
              amp_dtype: torch.dtype | None) -> dict[str, float]:
    """`evaluate(model)` in eval mode, without gradients, at the training precision."""
    model.eval()
    with torch.no_grad(), autocast(device, amp_dtype):
        result = evaluate(model)
    model.train()
    return result


def _to_host(values: list[Any], dtype: torch.dtype = torch.float64) -> list[float]:
    """Python floats of numbers and one-element tensors, the tensors copied to the host together (one sync)."""
    at = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
    out = [float(v) if i not in at else 0.0 for i, v in enumerate(values)]
    if at:
        full = [values[i].full_tensor() if hasattr(values[i], "full_tensor") else values[i] for i in at]  # DTensor
        host = torch.stack([v.detach().reshape(()).to(dtype) for v in full]).tolist()
        for i, v in zip(at, host):
            out[i] = v
    return out
