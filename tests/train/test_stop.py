"""Runs a user can stop and come back to: SIGINT/SIGTERM finish the step, checkpoint it and stop; a second
signal aborts at once and leaves the earlier checkpoints usable; resume takes the newest checkpoint that
loads; progress in a log file is plain lines."""

import os
import signal

import pytest
import torch

from lmforge.checkpoint import load_weights, write_model_folder
from lmforge.checkpoint.run import checkpoints
from lmforge.train.loop import Stopped, TrainConfig, fit
from tests.train.test_loop import get_batch, loss_fn, run, tiny_model


def _signalled(at_step: int, signum: int):
    """get_batch that sends `signum` to this process when step `at_step` (0-based) starts."""
    def batches(step, micro):
        if step == at_step and micro == 0:
            os.kill(os.getpid(), signum)
        return get_batch(step, micro)
    return batches


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_is_bit_identical(tmp_path, signum, capsys):
    straight, whole = run(tmp_path / "a", 10)
    model = tiny_model()
    cfg = TrainConfig(max_steps=10, lr=1e-2, warmup_steps=2, checkpoint_every=5, progress=False)
    save = lambda f: write_model_folder(model, None, f)  # noqa: E731
    with pytest.raises(Stopped) as e:
        fit(model, _signalled(6, signum), loss_fn, cfg, tmp_path / "b", grad_accum=2, save_model=save)
    assert e.value.step == 7 and e.value.signal_name == signal.Signals(signum).name
    assert e.value.checkpoint == tmp_path / "b" / "checkpoints" / "step-7"
    assert [p.name for p in checkpoints(tmp_path / "b")] == ["step-5", "step-7"]
    assert "stopping after this step" in capsys.readouterr().err
    assert signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL)  # handlers given back
    resumed, rest = run(tmp_path / "b", 10, resume=True, model=tiny_model(seed=123))
    assert rest.losses == whole.losses[7:]  # bit-identical, not approximately
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_second_sigint_while_the_checkpoint_is_written_aborts_and_keeps_the_previous_one(tmp_path):
    model = tiny_model()
    cfg = TrainConfig(max_steps=10, lr=1e-2, checkpoint_every=2, progress=False)
    calls = []

    def save(folder):
        calls.append(folder.name)
        write_model_folder(model, None, folder)
        if len(calls) == 3:  # the stop's checkpoint (step 5), half written: Ctrl-C again
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        fit(model, _signalled(4, signal.SIGINT), loss_fn, cfg, tmp_path, save_model=save)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-2", "step-4"]
    assert not list((tmp_path / "checkpoints").glob(".step-*"))  # the half-written one removed
    load_weights(tiny_model(seed=3), checkpoints(tmp_path)[-1])  # the previous one is whole


def test_resume_takes_the_newest_checkpoint_that_loads(tmp_path, capsys):
    straight, whole = run(tmp_path / "a", 15)
    run(tmp_path / "b", 15)  # checkpoints at 5, 10, 15
    (tmp_path / "b" / "checkpoints" / "step-15" / "model.safetensors").write_bytes(b"damaged")
    resumed, rest = run(tmp_path / "b", 15, resume=True, model=tiny_model(seed=9))
    err = capsys.readouterr().err
    assert "step-15 (" in err and "resuming from step-10" in err
    assert (tmp_path / "b" / "checkpoints" / "step-15.broken" / "model.safetensors").read_bytes() == b"damaged"
    assert rest.losses == whole.losses[10:]
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    for folder in checkpoints(tmp_path / "b"):  # now none loads: refused, never a fresh start
        (folder / "model.safetensors").write_bytes(b"damaged")
    with pytest.raises(ValueError, match="no checkpoint loads"):
        run(tmp_path / "b", 20, resume=True)


def test_the_command_line_names_the_command_that_continues(monkeypatch, capsys):
    from pathlib import Path

    from lmforge import cli

    def run_(argv):
        raise Stopped("SIGTERM", 37, Path("runs/x/checkpoints/step-37"))

    monkeypatch.setattr(cli, "run", run_)
    with pytest.raises(SystemExit) as e:
        cli.main(["pretrain", "--config", "my run.yaml"])
    assert e.value.code == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lmforge: stopped by SIGTERM after step 37; checkpoint runs/x/checkpoints/step-37. Continue "
                   "with: lmforge pretrain --config 'my run.yaml' --resume"]


def test_progress_in_a_log_file_is_plain_lines(capsys):
    from lmforge.utils import progress_bar

    for _ in progress_bar(range(5), desc="work", interval=0):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") >= 2 and "work: 100%" in err
