"""Data-parallel (DDP) and sharded (FSDP2) training in real processes on CPU (gloo): same losses and weights
as one process on the same global batch, checkpoints that resume across world sizes, a dead rank that ends
the run within the timeout, and the pretrain command under torchrun."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from lmforge.checkpoint import load, load_weights, write_model_folder
from lmforge.checkpoint.run import checkpoints
from lmforge.config import ModelConfig
from lmforge.data.labels import IGNORE
from lmforge.model import Transformer
from lmforge.train.distributed import DistributedError, init_distributed, shutdown
from lmforge.train.loop import TrainConfig, fit
from lmforge.train.losses import next_token_loss

CFG = ModelConfig.from_preset("tiny-llama", vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
GLOBAL_BATCH, MICRO = 8, 2  # rows per optimizer step (all processes together), rows per forward/backward
STEPS, HALF = 6, 3


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step`'s whole batch; row r does not count its first 2r targets, so processes hold different
    numbers of tokens and only a global normalisation gives the one-process result."""
    x = torch.randint(0, 64, (GLOBAL_BATCH, 17), generator=torch.Generator().manual_seed(step))
    y = x[:, 1:].clone()
    y[torch.arange(16)[None, :] < 2 * torch.arange(GLOBAL_BATCH)[:, None]] = IGNORE
    return x[:, :-1], y


def loss_fn(model, batch):
    loss, _ = next_token_loss(model(batch["x"]), batch["y"])
    return loss, {}


def train(run_dir, dist, steps: int, resume: bool = False):
    """(losses, full weights on rank 0) of a run to `steps` of STEPS, each process reading its rows of the
    global batch in micro-batches of MICRO rows (one process: 4 micro-batches, two: 2 each)."""
    rank, world = (dist.rank, dist.world_size) if dist else (0, 1)
    per = GLOBAL_BATCH // world

    def get_batch(step, micro):
        x, y = global_batch(step)
        rows = slice(rank * per + micro * MICRO, rank * per + (micro + 1) * MICRO)
        return {"x": x[rows], "y": y[rows], "n": int((y[rows] != IGNORE).sum())}

    torch.manual_seed(123 if resume else 0)  # a resumed run gets its weights from the checkpoint
    model = Transformer(CFG)
    cfg = TrainConfig(max_steps=STEPS, stop_at=steps, lr=1e-2, warmup_steps=2, checkpoint_every=HALF, resume=resume,
                      grad_clip=1.0, progress=False)
    res = fit(model, get_batch, loss_fn, cfg, run_dir, grad_accum=per // MICRO, dist=dist,
              save_model=lambda f: write_model_folder(model, None, f), load_model=lambda f: load_weights(model, f))
    with dist.gathered(model) if dist else nullcontext():
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()} if rank == 0 else None
    return res.losses, weights


# ---- running functions in several processes ------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    fn(rank, *args)
    shutdown()  # as the CLI ends: a process that exits with its group up may abort at exit (SIGABRT)


def spawn(fn, world: int, *args, join: bool = True):
    """fn(rank, *args) in `world` fresh processes that torchrun-like environment variables make one group."""
    return mp.spawn(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=join)


def _two_process_job(rank: int, strategy: str, tmp: Path) -> None:
    dist = init_distributed(strategy, timeout_s=120, device="cpu")
    out = {"straight": train(tmp / "straight", dist, STEPS)}
    first, _ = train(tmp / "split", dist, HALF)
    out["split"] = (first, *train(tmp / "split", dist, STEPS, resume=True))
    train(tmp / "to-one", dist, HALF)  # resumed by one process in the test
    out["from_one"] = train(tmp / "from-one", dist, STEPS, resume=True)  # written by one process
    train(tmp / "switch", dist, HALF)  # and resumed with the other strategy (the same process group)
    other = init_distributed({"ddp": "fsdp", "fsdp": "ddp"}[strategy], timeout_s=120, device="cpu")
    out["switched"] = train(tmp / "switch", other, STEPS, resume=True)
    if rank == 0:
        torch.save(out, tmp / "result.pt")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process: the reference run, and a checkpoint at step HALF."""
    tmp = tmp_path_factory.mktemp("single")
    straight = train(tmp / "straight", None, STEPS)
    train(tmp / "half", None, HALF)
    return straight, tmp / "half"


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def two(request, single, tmp_path_factory):
    """Two processes with the strategy: straight, stopped + resumed, and resumed from the one-process checkpoint."""
    tmp = tmp_path_factory.mktemp(request.param)
    shutil.copytree(single[1], tmp / "from-one")
    spawn(_two_process_job, 2, request.param, tmp)
    return torch.load(tmp / "result.pt", weights_only=True), tmp


def assert_weights_close(a: dict, b: dict, atol: float = 5e-4) -> None:
    """Weights after the run, within 5e-4 by default: processes sum the micro-batches' gradients in another
    order ((g1 + g2) + (g3 + g4) vs ((g1 + g2) + g3) + g4), and AdamW divides each entry by its own RMS, so an
    entry near zero turns that rounding into an update difference (measured: 1e-4 with lmforge's OpenBLAS
    products, 2e-6 with MKL's, at lr 1e-2). One lost micro-batch of a step moves the weights by 3e-2."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def test_two_processes_match_one(two, single):
    (losses, weights), _ = single
    out, _ = two
    torch.testing.assert_close(out["straight"][0], losses, atol=1e-5, rtol=0)
    assert_weights_close(out["straight"][1], weights)


def test_resume_with_the_same_world_size_is_exact(two):
    out, tmp = two
    first, second, weights = out["split"]
    assert first + second == out["straight"][0]  # bit-identical
    assert_weights_close(weights, out["straight"][1], atol=0)
    assert [p.name for p in checkpoints(tmp / "split")] == ["step-3", "step-6"]
    state = torch.load(checkpoints(tmp / "split")[-1] / "train_state.pt", weights_only=True)
    assert (state["world_size"], state["step"]) == (2, 6)


def test_two_process_checkpoint_resumes_in_one(two, single):
    (losses, weights), _ = single
    _, tmp = two
    resumed, resumed_weights = train(tmp / "to-one", None, STEPS, resume=True)
    torch.testing.assert_close(resumed, losses[HALF:], atol=1e-5, rtol=0)
    assert_weights_close(resumed_weights, weights)


def test_one_process_checkpoint_resumes_in_two(two, single):
    (losses, weights), _ = single
    out, _ = two
    torch.testing.assert_close(out["from_one"][0], losses[HALF:], atol=1e-5, rtol=0)
    assert_weights_close(out["from_one"][1], weights)


def test_checkpoint_resumes_under_the_other_strategy(two, single):
    (losses, weights), _ = single
    out, _ = two
    torch.testing.assert_close(out["switched"][0], losses[HALF:], atol=1e-5, rtol=0)
    assert_weights_close(out["switched"][1], weights)


def test_fsdp_checkpoint_holds_a_full_model_and_sharded_optimizer(two):
    out, tmp = two
    folder = checkpoints(tmp / "straight")[-1]
    model, _ = load(folder)  # a normal model folder, whatever the strategy
    assert_weights_close({k: v for k, v in model.state_dict().items()}, out["straight"][1], atol=0)
    state = torch.load(folder / "train_state.pt", weights_only=True)
    sharded = state["strategy"] == "fsdp"
    assert ("optimizer" in state) != sharded
    assert (folder / "optimizer" / ".metadata").exists() == sharded
    assert not list((tmp / "straight" / "checkpoints").glob(".step-*"))  # no temporary folders left


# ---- a dead or hung process ----------------------------------------------------------------------------

def _dead_rank_job(rank: int, mode: str, tmp: Path) -> None:
    dist = init_distributed("ddp", timeout_s=3, device="cpu")
    torch.manual_seed(0)
    model = Transformer(CFG)

    def get_batch(step, micro):
        if rank == 1 and step == 2:
            if mode == "exits":
                os._exit(1)
            time.sleep(600)  # hangs
        x, y = global_batch(step)
        rows = slice(rank * 4, rank * 4 + 4)
        return {"x": x[rows], "y": y[rows], "n": int((y[rows] != IGNORE).sum())}

    cfg = TrainConfig(max_steps=5, lr=1e-2, progress=False)
    try:
        fit(model, get_batch, loss_fn, cfg, tmp, dist=dist)
    except DistributedError as e:
        (tmp / f"error-{rank}.txt").write_text(str(e))
    os._exit(0)  # the group is broken: leave without waiting for it


@pytest.mark.parametrize("mode", ["exits", "hangs"])
def test_dead_rank_ends_the_run_with_a_message(tmp_path, mode):
    ctx = spawn(_dead_rank_job, 2, mode, tmp_path, join=False)
    rank0, rank1 = ctx.processes
    try:
        rank0.join(timeout=90)
        assert rank0.exitcode == 0, "rank 0 did not stop"
    finally:
        for p in ctx.processes:
            p.kill()
            p.join()
    error = (tmp_path / "error-0.txt").read_text()
    assert "rank 0 of 2: all-reduce failed" in error
    assert "Another process most likely died or stopped responding" in error
    if mode == "hangs":
        assert "train.dist_timeout = 3 s" in error and "Timed out" in error


# ---- choosing the strategy -----------------------------------------------------------------------------

def test_strategy_choice(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed("auto") is None and init_distributed("single") is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="strategy=single, but 2 processes"):
        init_distributed("single")
    with pytest.raises(ValueError, match="not one of auto, single, ddp, fsdp"):
        init_distributed("zero3")
    with pytest.raises(ValueError, match="dist_timeout"):
        init_distributed("ddp", timeout_s=0)
    with pytest.raises(ValueError, match="train.strategy"):
        TrainConfig(strategy="deepspeed")


# ---- the pretrain command under torchrun ---------------------------------------------------------------

def _losses(run_dir: Path) -> list[float]:
    """Training losses, then validation losses, of a run."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r] + [r["eval/val_loss"] for r in records if "eval/val_loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_pretrain_under_torchrun_matches_one_process(tmp_path, strategy):
    from lmforge.data.demo import write_corpus
    from lmforge.recipes.common import ModelSpec
    from lmforge.recipes.pretrain import PretrainConfig, PretrainData, run

    write_corpus(tmp_path / "corpus", n_docs=600)
    model = ModelSpec(preset="tiny-llama", overrides=dict(dim=32, n_layers=2, ffn_dim=64), device="cpu")
    train_cfg = dict(max_steps=4, lr=1e-2, warmup_steps=1, checkpoint_every=2, progress=False)
    one = PretrainConfig(out_dir=str(tmp_path / "one"), model=model, batch_size=4, micro_batch_size=1,
                         eval_batches=2, data=PretrainData(sources=[str(tmp_path / "corpus")], vocab_size=300,
                                                           seq_len=32, val_fraction=0.05),
                         train=TrainConfig(**train_cfg))
    run(one)
    config = {"out_dir": str(tmp_path / "two"), "batch_size": 4, "micro_batch_size": 1, "eval_batches": 2,
              "model": {"preset": "tiny-llama", "overrides": {"dim": 32, "n_layers": 2, "ffn_dim": 64},
                        "device": "cpu"},
              "data": {"prepared": str(tmp_path / "one" / "data"), "tokenizer": str(tmp_path / "one" / "tokenizer"),
                       "seq_len": 32},
              "train": {**train_cfg, "strategy": strategy, "dist_timeout": 120}}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lmforge", "pretrain", "--config", str(tmp_path / "two.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # only rank 0 writes and prints
    torch.testing.assert_close(_losses(tmp_path / "two"), _losses(tmp_path / "one"), atol=1e-4, rtol=0)
    a, _ = load(tmp_path / "one" / "model")
    b, tokenizer = load(tmp_path / "two" / "model")
    assert tokenizer is not None
    assert_weights_close(b.state_dict(), a.state_dict(), atol=1e-4)
    # and one process takes the two-process run on to step 6
    cmd = [sys.executable, "-m", "lmforge", "pretrain", "--config", str(tmp_path / "two.yaml"),
           "--train.max_steps", "6", "--train.resume", "true", "--train.strategy", "auto"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "written by 2 process(es), this run has 1" in proc.stdout
    assert [p.name for p in checkpoints(tmp_path / "two")] == ["step-4", "step-6"]


def _stopped_job(rank: int, tmp: Path) -> None:
    """SIGTERM to rank 1 alone during step 2: both processes stop after it, at the same step, with one
    checkpoint; the two resume to the end."""
    import signal

    from lmforge.train.loop import Stopped

    dist = init_distributed("ddp", timeout_s=120, device="cpu")
    real, sent = global_batch, []

    def signalled(step: int):  # (called once per micro-batch: the signal goes once)
        if step == 1 and rank == 1 and not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))
        return real(step)

    globals()["global_batch"] = signalled
    try:
        train(tmp / "stopped", dist, STEPS)
        stopped_at = None
    except Stopped as e:
        stopped_at = (e.step, e.signal_name)
    written = [p.name for p in checkpoints(tmp / "stopped")]
    globals()["global_batch"] = real
    losses, weights = train(tmp / "stopped", dist, STEPS, resume=True)
    if rank == 0:
        torch.save({"stopped_at": stopped_at, "written": written, "losses": losses, "weights": weights},
                   tmp / "stopped.pt")
    else:
        torch.save({"stopped_at": stopped_at}, tmp / "stopped-1.pt")


def test_a_sigterm_to_one_process_stops_both_at_one_step_and_they_resume_to_one_processs_weights(tmp_path, single):
    (losses, weights), _ = single
    spawn(_stopped_job, 2, tmp_path)
    out, other = torch.load(tmp_path / "stopped.pt", weights_only=True), torch.load(tmp_path / "stopped-1.pt")
    assert out["stopped_at"] == (2, "a signal to another process") and other["stopped_at"] == (2, "SIGTERM")
    assert out["written"] == ["step-2"]  # the stop's checkpoint, one for both processes
    torch.testing.assert_close(out["losses"], losses[2:], atol=1e-5, rtol=0)
    assert_weights_close(out["weights"], weights)
