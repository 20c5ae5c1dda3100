"""Data-parallel scaling: tokens/s of 1 and 2 processes on the same global batch, through `fit`, on CPU (gloo),
and an estimate for 8 GPUs from a measured single-process step time and the bytes each step communicates.

On 2 CPU cores two processes cannot go faster than one (they split the same cores); what the table shows is
the overhead: what a 2-process step costs beyond the compute of its half of the batch (gradient all-reduce,
FSDP's gathers, synchronisation). `--gpu` measures one GPU instead (bf16 autocast) for the estimate.

    python benchmarks/scaling.py [--steps 8] [--gpu] [--busbw-gbs 350]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.train.distributed import init_distributed
from lmforge.train.loop import TrainConfig, fit
from lmforge.train.losses import next_token_loss

CPU_SHAPE = dict(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=688)
CPU_BATCH, CPU_MICRO, CPU_SEQ = 8, 4, 256  # global batch (rows), rows per forward, tokens per row
GPU_SHAPES = {  # as benchmarks/gpu_pretrain.py: (model, rows per step, seq)
    "135M": (dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536), 16, 2048),
    "500M": (dict(vocab_size=32000, dim=1280, n_layers=24, n_heads=20, n_kv_heads=4, ffn_dim=3456), 8, 2048),
}


def loss_fn(model, batch):
    loss, _ = next_token_loss(model(batch["x"]), batch["y"])
    return loss, {}


def timed_run(shape: dict, batch: int, micro: int, seq: int, steps: int, device: str, dist=None) -> list[float]:
    """Seconds per optimizer step (after 2 warm-up steps) of `fit` on random tokens; this process reads its
    rows of each global batch of `batch` rows, `micro` rows per forward."""
    rank, world = (dist.rank, dist.world_size) if dist else (0, 1)
    per = batch // world
    cfg = ModelConfig.from_preset("tiny-llama", max_seq_len=seq, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    data = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    stamps: list[float] = []

    def get_batch(step: int, i: int) -> dict:
        if i == 0:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
        rows = data[rank * per + i * micro: rank * per + (i + 1) * micro]
        return {"x": rows[:, :-1], "y": rows[:, 1:], "n": rows[:, 1:].numel()}

    train = TrainConfig(max_steps=steps + 3, lr=1e-4, warmup_steps=1, progress=False, log_every=10**6)
    with tempfile.TemporaryDirectory() as tmp:
        fit(model, get_batch, loss_fn, train, tmp, grad_accum=per // micro, dist=dist)
    return [b - a for a, b in zip(stamps[2:], stamps[3:])]


def all_reduce_seconds(n_params: int, dist, repeats: int = 5) -> float:
    """Time of one all-reduce of n_params fp32 values (what DDP sends per step, in buckets)."""
    flat = torch.zeros(n_params, device=dist.device)
    torch.distributed.all_reduce(flat)
    times = []
    for _ in range(repeats):
        dist.barrier()
        t = time.perf_counter()
        torch.distributed.all_reduce(flat)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _worker(rank: int, world: int, port: int, strategy: str, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
    dist = init_distributed(strategy, timeout_s=600, device="cpu")
    times = timed_run(CPU_SHAPE, CPU_BATCH, CPU_MICRO, CPU_SEQ, steps, "cpu", dist)
    n_params = sum(p.numel() for p in Transformer(ModelConfig.from_preset("tiny-llama", **CPU_SHAPE)).parameters())
    allreduce = all_reduce_seconds(n_params, dist)
    if rank == 0:
        Path(out).write_text(json.dumps({"times": times, "allreduce": allreduce}))


def spawn(strategy: str, world: int, steps: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(world, port, strategy, steps, out), nprocs=world)
        return json.loads(Path(out).read_text())


def estimate(name: str, n_params: int, step_s: float, tokens: int, busbw: float, gpus: int = 8) -> None:
    """8 GPUs, each with the measured per-GPU batch (global batch x 8): step = compute + exposed communication."""
    ring = 2 * (gpus - 1) / gpus
    ddp_bytes = ring * 4 * n_params  # all-reduce of fp32 gradients
    fsdp_bytes = 3 * (gpus - 1) / gpus * 4 * n_params  # all-gather fwd + all-gather bwd + reduce-scatter, fp32
    print(f"\n8-GPU estimate for {name} ({n_params / 1e6:.0f}M parameters), measured 1-GPU step "
          f"{step_s * 1e3:.1f} ms for {tokens:,} tokens ({tokens / step_s:,.0f} tokens/s), assumed NCCL bus "
          f"bandwidth {busbw / 1e9:.0f} GB/s (NVLink 4, H100 SXM: 450 GB/s each way):")
    print(f"{'strategy':<8} {'bytes/GPU/step':>15} {'comm ms':>8} {'tokens/s, no overlap':>22} "
          f"{'tokens/s, full overlap':>23} {'speedup':>12}")
    for strategy, volume in (("ddp", ddp_bytes), ("fsdp", fsdp_bytes)):
        comm = volume / busbw
        worst, best = gpus * tokens / (step_s + comm), gpus * tokens / max(step_s, comm)
        print(f"{strategy:<8} {volume / 1e9:>12.2f} GB {comm * 1e3:>8.1f} {worst:>22,.0f} {best:>23,.0f} "
              f"{worst * step_s / tokens:>5.2f}-{best * step_s / tokens:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per configuration (after 2 warm-up)")
    ap.add_argument("--gpu", action="store_true", help="measure one CUDA GPU on the 135M/500M shapes instead")
    ap.add_argument("--busbw-gbs", type=float, default=350.0, help="assumed NCCL all-reduce bus bandwidth, GB/s")
    a = ap.parse_args()
    busbw = a.busbw_gbs * 1e9
    if a.gpu:
        for name, (shape, batch, seq) in GPU_SHAPES.items():
            step = statistics.median(timed_run(shape, batch, batch, seq, a.steps, "cuda"))
            n = sum(p.numel() for p in Transformer(ModelConfig.from_preset("tiny-llama", **shape,
                                                                            max_seq_len=seq)).parameters())
            estimate(name, n, step, batch * seq, busbw)
        return
    cores = len(os.sched_getaffinity(0))  # the cores this process may use (taskset)
    tokens = CPU_BATCH * CPU_SEQ
    torch.set_num_threads(cores)
    one = statistics.median(timed_run(CPU_SHAPE, CPU_BATCH, CPU_MICRO, CPU_SEQ, a.steps, "cpu"))
    torch.set_num_threads(max(1, cores // 2))  # one process's share of the cores when two run
    half = statistics.median(timed_run(CPU_SHAPE, CPU_BATCH // 2, CPU_MICRO, CPU_SEQ, a.steps, "cpu"))
    rows = [("single", 1, cores, one)]
    comm = {}
    for strategy in ("ddp", "fsdp"):
        r = spawn(strategy, 2, a.steps)
        rows.append((strategy, 2, max(1, cores // 2), statistics.median(r["times"])))
        comm[strategy] = r["allreduce"]
    n_params = sum(p.numel() for p in Transformer(ModelConfig.from_preset("tiny-llama", **CPU_SHAPE)).parameters())
    print(f"CPU, {cores} cores, gloo; model {n_params / 1e6:.1f}M parameters; global batch {CPU_BATCH} x {CPU_SEQ} "
          f"= {tokens:,} tokens, {CPU_MICRO} rows per forward")
    print(f"{'strategy':<8} {'processes':>9} {'threads/proc':>12} {'step ms':>9} {'tokens/s':>10} {'vs 1 process':>13}")
    for strategy, procs, threads, t in rows:
        print(f"{strategy:<8} {procs:>9} {threads:>12} {t * 1e3:>9.1f} {tokens / t:>10,.0f} {one / t:>12.2f}x")
    print(f"\none process, {max(1, cores // 2)} thread(s), half the batch ({tokens // 2:,} tokens): {half * 1e3:.1f} ms "
          "- the compute each of 2 processes does per step")
    for strategy, _, _, t in rows[1:]:
        print(f"{strategy} overhead per step: {(t - half) * 1e3:.1f} ms ({(t - half) / t:.0%} of the step); "
              f"one all-reduce of all {n_params / 1e6:.1f}M fp32 gradients over gloo: {comm[strategy] * 1e3:.1f} ms")
    print(f"ratio 2 processes / 1 process, tokens/s: ddp {one / rows[1][3]:.2f}x, fsdp {one / rows[2][3]:.2f}x")
    estimate("this CPU model, as if on GPUs", n_params, one, tokens, busbw)


if __name__ == "__main__":
    main()
