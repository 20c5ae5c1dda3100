"""The one training loop: exact resume, atomic checkpoints under SIGKILL, non-finite handling, schedules."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from lmforge.checkpoint import load_weights, write_model_folder
from lmforge.checkpoint.run import checkpoints
from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.train.loop import NonFiniteError, TrainConfig, fit
from lmforge.train.losses import next_token_loss
from lmforge.train.optim import lr_factor, param_groups
from tests.fixtures.tiny import make_tiny


def tiny_model(seed=0):
    return make_tiny(64, seed, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)


def get_batch(step, micro):
    g = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randint(0, 64, (4, 17), generator=g)
    return {"x": x[:, :-1], "y": x[:, 1:], "n": 4 * 16}


def loss_fn(model, batch):
    loss, _ = next_token_loss(model(batch["x"]), batch["y"])
    return loss, {}


def run(tmp, steps, resume=False, model=None, **kw):
    model = model or tiny_model()
    cfg = TrainConfig(max_steps=kw.pop("max_steps", steps), stop_at=steps, lr=1e-2, warmup_steps=2, checkpoint_every=5, resume=resume,
                      progress=False, **kw)
    res = fit(model, get_batch, loss_fn, cfg, tmp, grad_accum=2,
              save_model=lambda f: write_model_folder(model, None, f), load_model=lambda f: load_weights(model, f))
    return model, res


def test_exact_resume_is_bit_identical(tmp_path):
    straight, r1 = run(tmp_path / "a", 10)
    _, first = run(tmp_path / "b", 5, max_steps=10)
    resumed, second = run(tmp_path / "b", 10, resume=True, model=tiny_model(seed=123))  # weights come from disk
    assert first.losses + second.losses == r1.losses  # bit-identical, not approximately
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert [p.name for p in checkpoints(tmp_path / "b")] == ["step-5", "step-10"]
    lines = [json.loads(s) for s in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 11))


def test_loss_decreases_and_keep_last(tmp_path):
    model = tiny_model()
    seq = (torch.arange(17) * 7 % 64).repeat(4, 1)  # one memorisable sequence
    cfg = TrainConfig(max_steps=20, lr=1e-2, warmup_steps=2, checkpoint_every=5, keep_last=1, progress=False)
    res = fit(model, lambda s, m: {"x": seq[:, :-1], "y": seq[:, 1:], "n": 64}, loss_fn, cfg, tmp_path,
              save_model=lambda f: write_model_folder(model, None, f))
    assert res.losses[-1] < 0.5 * res.losses[0]
    assert [p.name for p in checkpoints(tmp_path)] == ["step-20"]


def test_sigkill_while_writing_leaves_previous_checkpoint(tmp_path):
    """A real process, killed with SIGKILL in the middle of writing its second checkpoint."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.getcwd()!r})
        import safetensors.torch as st
        import lmforge.checkpoint.native as native
        from tests.train.test_loop import run
        calls = []
        real = st.save_file
        def dying_save(tensors, path, metadata=None):
            calls.append(path)
            if len(calls) == 2:
                with open(path, "wb") as f:
                    f.write(b"half a file")
                os.kill(os.getpid(), signal.SIGKILL)
            return real(tensors, path, metadata=metadata)
        native.save_file = dying_save
        run({str(tmp_path)!r}, 20)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    done = checkpoints(tmp_path)
    assert [p.name for p in done] == ["step-5"]
    assert list((tmp_path / "checkpoints").glob(".step-10.tmp-*"))  # the half-written one, never trusted
    model = tiny_model(seed=7)
    load_weights(model, done[-1])  # the previous checkpoint is whole
    _, res = run(tmp_path, 12, resume=True)  # and training resumes from it
    assert [p.name for p in checkpoints(tmp_path)] == ["step-10", "step-12"]
    assert not list((tmp_path / "checkpoints").glob(".step-*.tmp-*"))


def test_nonfinite_loss_stops_without_overwriting_checkpoint(tmp_path):
    model = tiny_model()

    def poisoned(step, micro):  # the weights go bad during step 8 (0-based index 7)
        if step == 7:
            with torch.no_grad():
                model.tok_emb.weight.fill_(float("nan"))
        return get_batch(step, micro)

    cfg = TrainConfig(max_steps=10, lr=1e-2, checkpoint_every=1, keep_last=20, progress=False)
    with pytest.raises(NonFiniteError, match="step 8: loss is nan"):
        fit(model, poisoned, loss_fn, cfg, tmp_path, save_model=lambda f: write_model_folder(model, None, f))
    assert [p.name for p in checkpoints(tmp_path)][-1] == "step-7"
    good = tiny_model(seed=5)
    load_weights(good, checkpoints(tmp_path)[-1])
    assert all(torch.isfinite(p).all() for p in good.parameters())


def test_skip_nonfinite_continues(tmp_path):
    model = tiny_model()

    def nan_at_step_3(m, b):
        value, extra = loss_fn(m, b)
        return (value + float("nan") if b["step"] == 3 else value), extra

    cfg = TrainConfig(max_steps=6, lr=1e-2, skip_nonfinite=True, progress=False)
    res = fit(model, lambda s, m: {**get_batch(s, m), "step": s}, nan_at_step_3, cfg, tmp_path)
    assert len(res.losses) == 5 and all(math.isfinite(v) for v in res.losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    records = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 4, "skipped_nonfinite": 1} in records


def test_schedules():
    assert lr_factor(0, "cosine", 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, "cosine", 10, 100) == pytest.approx(1.0)
    assert lr_factor(100, "cosine", 10, 100, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(55, "cosine", 10, 100, min_ratio=0.0) == pytest.approx(0.5)
    assert lr_factor(50, "constant", 10, 100) == 1.0
    assert lr_factor(10 + 2500, "step", 10, 10**5, step_size=1000, gamma=0.5) == 0.25
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")


def test_no_weight_decay_on_norms_biases_embeddings():
    model = Transformer(ModelConfig.from_preset("tiny-gpt2"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("weight") and "norm" not in names[id(p)] and "emb" not in names[id(p)]
               for p in decay["params"])
    assert {"tok_emb.weight", "pos_emb.weight", "norm.bias", "layers.0.attn.qkv.bias"} <= {
        names[id(p)] for p in no_decay["params"]}


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """A run stopped at step 7 (last checkpoint: step 5) logged steps 6 and 7; resuming redoes them from the
    checkpoint, and metrics.jsonl keeps one record per step (also after a killed run's partial last line)."""
    run(tmp_path, 7, max_steps=10)
    shutil.rmtree(tmp_path / "checkpoints" / "step-7")  # as if killed after step 7, before its checkpoint
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')
    run(tmp_path, 10, resume=True, model=tiny_model(seed=123))
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 11))
