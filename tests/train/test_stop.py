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


def test_a_training_log_in_a_file_gets_lines_per_interval_not_per_step(tmp_path, capsys, monkeypatch):
    import functools

    from lmforge.train import loop
    from lmforge.utils import progress_bar

    monkeypatch.setattr(loop, "progress_bar", functools.partial(progress_bar, interval=3600))  # no clock involved
    model = tiny_model()
    fit(model, get_batch, loss_fn, TrainConfig(max_steps=30, lr=1e-2, progress=True), tmp_path)
    lines = capsys.readouterr().err.strip().splitlines()
    assert "\r" not in "".join(lines) and len(lines) == 2, lines  # the start and the end, none per step
    assert "30/30" in lines[-1] and "loss=" in lines[-1]


# ---- a stop outside the step: during an evaluation, the final save, the data preparation -----------------

def test_a_signal_during_an_evaluation_stops_at_that_step(tmp_path):
    straight, whole = run(tmp_path / "a", 10)
    model = tiny_model()
    fixed = get_batch(99, 0)

    def evaluate(m):
        if not (tmp_path / "b" / "checkpoints" / "step-2").exists():  # the evaluation after step 4
            return {}
        os.kill(os.getpid(), signal.SIGTERM)
        return {"val_loss": float(loss_fn(m, fixed)[0])}

    cfg = TrainConfig(max_steps=10, lr=1e-2, warmup_steps=2, checkpoint_every=2, eval_every=4, progress=False)
    with pytest.raises(Stopped) as e:
        fit(model, get_batch, loss_fn, cfg, tmp_path / "b", grad_accum=2, evaluate=evaluate,
            save_model=lambda f: write_model_folder(model, None, f))
    assert e.value.step == 4 and [p.name for p in checkpoints(tmp_path / "b")] == ["step-2", "step-4"]
    resumed, rest = run(tmp_path / "b", 10, resume=True, model=tiny_model(seed=5))
    assert rest.losses == whole.losses[4:]
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_sigterm_during_the_final_evaluation_leaves_the_last_step_to_resume(tmp_path):
    from lmforge.utils import Terminated, sigterm_interrupts

    straight, _ = run(tmp_path / "a", 10)
    model = tiny_model()
    cfg = TrainConfig(max_steps=10, lr=1e-2, warmup_steps=2, checkpoint_every=4, eval_every=100, progress=False)
    with sigterm_interrupts(), pytest.raises(Terminated):
        fit(model, get_batch, loss_fn, cfg, tmp_path / "b", grad_accum=2,
            evaluate=lambda m: os.kill(os.getpid(), signal.SIGTERM) or {},
            save_model=lambda f: write_model_folder(model, None, f))
    assert [p.name for p in checkpoints(tmp_path / "b")] == ["step-8", "step-10"]  # the last step's is written
    resumed, rest = run(tmp_path / "b", 10, resume=True, model=tiny_model(seed=5))
    assert rest.step == 10 and rest.losses == []  # nothing to train again
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def _pretrain_argv(init, corpus, out):
    return ["pretrain", "--out_dir", str(out), "--model.init_from", str(init), "--model.device", "cpu",
            "--data.sources", f"[{corpus}]", "--data.seq_len", "16", "--data.val_fraction", "0.2",
            "--batch_size", "4", "--eval_batches", "2", "--train.max_steps", "6", "--train.checkpoint_every", "4",
            "--train.progress", "false"]


def test_sigterm_during_the_final_save_keeps_no_half_model_and_resume_writes_it(tmp_path, tiny_folder, monkeypatch,
                                                                              capsys):
    import lmforge
    from lmforge.checkpoint import native
    from lmforge.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"the cat {i} sat on the mat {i % 5}" for i in range(200)) + "\n")
    main(_pretrain_argv(tiny_folder, corpus, tmp_path / "a"))  # uninterrupted
    write = native.save_file

    def save_file(tensors, path, **kw):  # SIGTERM once the final model's weights are half written
        write(tensors, path, **kw)
        if "checkpoints" not in str(path):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(native, "save_file", save_file)
    argv = _pretrain_argv(tiny_folder, corpus, tmp_path / "b")
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 143
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lmforge: stopped by SIGTERM; what was written whole is kept. Continue with: lmforge "
                          "pretrain") and err.endswith(" --resume")
    run_dir = tmp_path / "b"
    assert not (run_dir / "model").exists() and [p.name for p in run_dir.iterdir() if "model" in p.name] == []
    assert [p.name for p in checkpoints(run_dir)] == ["step-4", "step-6"]
    monkeypatch.setattr(native, "save_file", write)
    main([*argv, "--resume"])
    a, _ = lmforge.load(tmp_path / "a" / "model", device="cpu")
    b, _ = lmforge.load(run_dir / "model", device="cpu")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


def test_sigterm_while_the_data_is_prepared_keeps_the_finished_parts_and_a_rerun_completes(tmp_path, tiny_folder,
                                                                                         monkeypatch, capsys):
    from lmforge.cli import main
    from lmforge.data import prepare as prep

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text("\n\n".join(f"doc {i}.{j}: the cat sat on the mat" for j in range(30)))
    argv = lambda out: ["prepare", str(corpus), "--tokenizer", str(tiny_folder), "--out", str(out),  # noqa: E731
                        "--workers", "1", "--val-fraction", "0.2"]
    monkeypatch.setattr(prep, "MIN_PART_BYTES", 512)  # parts of ~2 files, not one part of everything
    main(argv(tmp_path / "a"))
    parts = len(list((tmp_path / "a").glob("part-*.json")))
    assert parts >= 3
    run_part, done, stopped = prep._run_part, [], []

    def part_then_sigterm(job, backend=None):
        meta = run_part(job, backend)
        done.append(job.part.index)
        if len(done) == 3 and not stopped:
            stopped.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return meta

    monkeypatch.setattr(prep, "_run_part", part_then_sigterm)
    with pytest.raises(SystemExit) as e:
        main(argv(tmp_path / "b"))
    assert e.value.code == 143
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lmforge: stopped by SIGTERM") and err.endswith("--val-fraction 0.2")
    assert not (tmp_path / "b" / "manifest.json").exists()  # not a prepared folder anyone trusts yet
    done.clear()
    main(argv(tmp_path / "b"))
    assert len(done) == parts - 3  # only the parts not finished before
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        if name != "manifest.json":
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert prep.Manifest.load(tmp_path / "a").splits == prep.Manifest.load(tmp_path / "b").splits
