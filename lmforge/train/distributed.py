"""Many processes (GPUs, machines) over torch.distributed: one `Dist` per process, made by `init_distributed`
from what torchrun puts in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    torchrun --nproc-per-node 8 -m lmforge pretrain --config run.yaml --train.strategy fsdp

Strategies: `ddp` keeps a whole model per process and all-reduces gradients (DistributedDataParallel);
`fsdp` shards parameters, gradients and optimizer state over the processes (FSDP2 `fully_shard`, per
transformer block, then the root), for models whose training state (weights, gradients and AdamW's two
moments: 16 bytes a parameter in fp32) does not fit one device. Each process builds the model on its device
with the seed one process would use, so every strategy starts from the same weights, and FSDP then shards
it: the weights alone (4 bytes a parameter) must fit one device for that moment.

Each process reads its own slice of every global batch and `fit` normalises the loss by the global count,
so the result does not depend on the number of processes. Checkpoints hold the full model as a normal model
folder; the optimizer state is one file (single process, DDP) or sharded with torch.distributed.checkpoint
(FSDP), and `load_optimizer_state` reads either kind into any strategy and number of processes.
"""

from __future__ import annotations

import inspect
import os
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from lmforge.checkpoint.atomic import atomic_folder
from lmforge.checkpoint.run import TRAIN_STATE, write_checkpoint
from lmforge.utils import resolve_device

STRATEGIES = ("auto", "single", "ddp", "fsdp")
_COMM_FAILURE = re.compile(r"gloo|nccl|timed out|timeout|connection|pair closure|peer", re.IGNORECASE)


class DistributedError(RuntimeError):
    """A collective failed: another process died, hung past the timeout, or the network broke."""


@dataclass
class Dist:
    """This process's place in a multi-process run, and the few collectives the training loop needs.

    Attributes:
        rank: this process, 0 .. world_size - 1 (rank 0 prints, logs and writes files).
        world_size: the number of processes.
        local_rank: this process on its machine (its GPU index).
        strategy: ddp or fsdp.
        device: this process's device (cuda:<local_rank>, or cpu with the gloo backend).
        timeout_s: how long a collective waits for the other processes before failing.
    """

    rank: int
    world_size: int
    local_rank: int
    strategy: str
    device: torch.device
    timeout_s: float

    # ---- collectives -----------------------------------------------------------------------------------

    @contextmanager
    def _collective(self, what: str, only_comm_errors: bool = False) -> Iterator[None]:
        try:
            yield
        except DistributedError:
            raise
        except RuntimeError as e:
            if only_comm_errors and not _COMM_FAILURE.search(str(e)):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed ({first}). Another process most likely "
                f"died or stopped responding - see its log. Processes wait train.dist_timeout = "
                f"{self.timeout_s:g} s for each other before giving up.") from e

    def all_reduce_sum(self, x: float) -> float:
        """The sum of `x` over all processes."""
        with self._collective("all-reduce"):
            t = torch.tensor([float(x)], dtype=torch.float64, device=self.device)
            tdist.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        with self._collective("barrier"):
            tdist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process (any picklable object)."""
        box = [obj]
        with self._collective("broadcast"):
            tdist.broadcast_object_list(box, src=0)
        return box[0]

    # ---- the model -------------------------------------------------------------------------------------

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around `model`, or `model` sharded in place by FSDP2 (each transformer block, then the root).
        A model already wrapped is returned as it is."""
        from torch.distributed.fsdp import FSDPModule, fully_shard
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, (DistributedDataParallel, FSDPModule)):
            return model
        if self.strategy == "ddp":
            # buffers (RoPE tables) are the same everywhere and never change: no broadcast per forward
            # (the argument's name since torch 2.13; broadcast_buffers before)
            no_buffer_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
                DistributedDataParallel).parameters else "broadcast_buffers"
            return DistributedDataParallel(model.to(self.device), **{no_buffer_sync: False},
                                           device_ids=[self.device.index] if self.device.type == "cuda" else None)
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        for block in getattr(model, "layers", []):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the rest: embeddings, final norm, LM head
        return model

    @contextmanager
    def no_sync(self, model: nn.Module, skip: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: with `skip`, gradients accumulate locally without
        communication (every micro-batch but the last of a step). A failed gradient all-reduce or
        reduce-scatter becomes a DistributedError."""
        from torch.distributed.fsdp import FSDPModule
        from torch.nn.parallel import DistributedDataParallel

        with self._collective("forward/backward", only_comm_errors=True):
            if not skip:
                yield
            elif isinstance(model, DistributedDataParallel):
                with model.no_sync():
                    yield
            elif isinstance(model, FSDPModule):
                model.set_requires_gradient_sync(False)
                try:
                    yield
                finally:
                    model.set_requires_gradient_sync(True)
            else:
                yield

    @contextmanager
    def gathered(self, model: nn.Module) -> Iterator[None]:
        """Inside, `model.state_dict()` on rank 0 holds the full weights as plain CPU tensors, so any code
        that saves a model's state dict (`write_model_folder`, `save`) writes the whole model. Under FSDP this
        gathers the shards: a collective, so every process must enter it."""
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(model, FSDPModule):
            yield
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        with self._collective("gathering the full model"):
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

        def full_weights(module, state, prefix, local_metadata) -> None:
            if not prefix:
                state.update(full)

        handle = model.register_state_dict_post_hook(full_weights) if self.rank == 0 else None
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()

    # ---- checkpoints -----------------------------------------------------------------------------------

    def save_checkpoint(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        save_model: Callable[[Path], None], state: dict[str, Any]) -> None:
        """Writes checkpoint `folder` atomically (a temporary folder renamed by rank 0 when complete): the full
        model (save_model, on rank 0) and train_state.pt; the optimizer state inside train_state.pt (DDP: every
        process has all of it) or, under FSDP, sharded with torch.distributed.checkpoint in `optimizer/`
        (each process writes its own shards). A collective: every process calls it."""
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(model, FSDPModule):
            if self.rank == 0:
                write_checkpoint(folder, save_model, {**state, "optimizer": optimizer.state_dict()})
            self.barrier()
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        shards = get_optimizer_state_dict(model, optimizer)  # this process's shards, no communication
        with atomic_folder(folder) if self.rank == 0 else nullcontext() as tmp:
            tmp = Path(self.broadcast(str(tmp) if self.rank == 0 else None))
            with self._collective("writing the sharded optimizer state"):
                # returns on rank 0 once every process has written its shards and rank 0 the metadata
                dcp.save({"optimizer": shards}, checkpoint_id=tmp / "optimizer")
            with self.gathered(model):
                if self.rank == 0:
                    save_model(tmp)
                    torch.save(state, tmp / TRAIN_STATE)  # its presence marks the checkpoint complete
        self.barrier()  # nobody goes on (or prunes) before rank 0 has renamed the folder



def init_distributed(strategy: str = "auto", timeout_s: float = 1800.0, device: str = "auto") -> Dist | None:
    """The `Dist` of this process, or None for a single-process run.

    strategy: auto (single for one process, else ddp), single, ddp or fsdp. The number of processes comes
      from torchrun (WORLD_SIZE); ddp / fsdp without torchrun run as a group of one.
    timeout_s: a collective waiting longer than this for the other processes fails the run with a message
      (instead of hanging forever when one process has died).
    device: the model's device setting (auto, cpu, cuda): nccl on CUDA (process i on GPU LOCAL_RANK), gloo on CPU.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"train.strategy={strategy!r} is not one of {', '.join(STRATEGIES)}")
    if timeout_s <= 0:
        raise ValueError(f"train.dist_timeout must be > 0 seconds, got {timeout_s}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if strategy == "single" and world > 1:
        raise ValueError(f"train.strategy=single, but {world} processes were started (torchrun "
                         "--nproc-per-node); use auto, ddp or fsdp, or start one process")
    if strategy == "single" or (strategy == "auto" and world == 1):
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"process with LOCAL_RANK {local_rank} has no GPU: this machine has "
                             f"{torch.cuda.device_count()}; start at most that many processes per machine")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    timeout = timedelta(seconds=timeout_s)
    if not tdist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:  # started by torchrun (or a launcher that sets the same variables)
            tdist.init_process_group(backend, timeout=timeout, device_id=dev if dev.type == "cuda" else None)
        else:  # one process: a group of one, no network
            tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return Dist(rank=tdist.get_rank(), world_size=tdist.get_world_size(), local_rank=local_rank,
                strategy="ddp" if strategy == "auto" else strategy, device=dev, timeout_s=timeout_s)


def shutdown() -> None:
    """Ends the process group if one is running (the CLI calls this when a command finishes, in every process).
    The processes first wait for one another: one that tore its group down while another was still writing the
    last checkpoint aborted at exit now and then on a loaded 2-core machine ("terminate called without an active
    exception", SIGABRT, in the FSDP torchrun test)."""
    if tdist.is_initialized():
        if tdist.get_world_size() > 1:
            try:
                tdist.barrier()
            except Exception:  # noqa: BLE001 - a peer already gone: tear down all the same
                pass
        tdist.destroy_process_group()


def load_optimizer_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                         state: dict[str, Any]) -> None:
    """Restores the optimizer from checkpoint `folder`, whatever strategy and number of processes wrote it and
    whichever reads it: a full state dict in train_state.pt (single process, DDP) or DCP shards in
    `folder/optimizer` (FSDP; DCP re-shards them for another number of processes, or for whole tensors).
    `model` is what the optimizer trains (plain, DDP or FSDP); under several processes, a collective."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    inner = model.module if isinstance(model, DistributedDataParallel) else model
    sharded = isinstance(inner, FSDPModule)
    if "optimizer" in state and not sharded:
        optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    if "optimizer" in state:  # a whole state dict into a sharded model: every process keeps its own shards
        set_optimizer_state_dict(inner, optimizer, _by_name(inner, optimizer, state["optimizer"]),
                                 options=StateDictOptions(full_state_dict=True))
        return
    import torch.distributed.checkpoint as dcp

    if not (folder / "optimizer").is_dir():
        raise ValueError(f"{folder}: {TRAIN_STATE} has no optimizer state and there is no optimizer/ folder")
    target = get_optimizer_state_dict(inner, optimizer)  # the tensors to fill: shards, or whole tensors
    with warnings.catch_warnings():  # one process reading every shard is what we mean here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"optimizer": target}, checkpoint_id=folder / "optimizer", no_dist=not tdist.is_initialized())
    set_optimizer_state_dict(inner, optimizer, target)


def _by_name(model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
    """`optimizer.state_dict()` (parameters numbered in param-group order) keyed by parameter name instead,
    the form torch.distributed.checkpoint.state_dict reads."""
    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {order[i]: s for i, s in sd["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]]}
