"""The command line, driven in-process: generate (plain and streamed) prints what `generate` returns; eval prints
what `perplexity` / `multiple_choice` return; convert writes a folder that lmforge and `transformers` read to the
same logits; plot draws a PNG of a run; a training run leaves TensorBoard event files holding its losses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.cli import main, run
from lmforge.evaluate import choice_logprobs, multiple_choice, perplexity
from lmforge.generate import generate
from tests.fixtures.hf_models import hf_model

TEXTS = ["The cat sat on the mat.", "A dog ran in the park.", "Numbers: 12345 and 678.", "A longer document " * 6]
PROMPT = "The cat"


@pytest.fixture(scope="module")
def folder(tiny_folder) -> Path:
    """A tiny random llama-family model with a byte-level BPE tokenizer, saved as a model folder."""
    return tiny_folder


@pytest.fixture(scope="module")
def loaded(folder):
    return lmforge.load(folder, device="cpu")


def _greedy_by_hand(model, ids: list[int], n: int, eos: int) -> list[int]:
    """argmax of a full forward pass, token by token (no cache), stopping at eos (not returned)."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if t == eos:
                break
            out.append(t)
    return out


# ---- generate --------------------------------------------------------------------------------------------


def test_generate_prints_the_greedy_continuation(folder, loaded, capsys):
    model, tok = loaded
    ids = tok.encode(PROMPT)
    new = generate(model, [ids], 12, tokenizer=tok)[0]
    assert new == _greedy_by_hand(model, ids, 12, tok.eos_id)
    assert len(new) > 0  # otherwise the comparison below would be vacuous
    expected = tok.decode(new, skip_special_tokens=True)

    run(["generate", "--model", str(folder), "--prompt", PROMPT, "--max-new-tokens", "12", "--device", "cpu"])
    assert capsys.readouterr().out == expected + "\n"

    run(["generate", "--model", str(folder), "--prompt", PROMPT, "--max-new-tokens", "12", "--device", "cpu",
         "--stream"])
    assert capsys.readouterr().out == expected + "\n"


def test_generate_without_a_model_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tmp_path / "nothing"), "--prompt", "hi", "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: ") and str(tmp_path / "nothing") in err
    assert "Traceback" not in err


# ---- eval ------------------------------------------------------------------------------------------------


def _fields(line: str) -> dict[str, str]:
    """'loss: 1.2345  ppl: 3.4364  tokens: 97' -> {'loss': '1.2345', ...}"""
    return dict(re.findall(r"(\w+): (\S+)", line))


@pytest.mark.parametrize("name", ["docs.txt", "docs.jsonl"])
def test_eval_prints_the_perplexity_of_the_file(folder, loaded, tmp_path, capsys, name):
    model, tok = loaded
    path = tmp_path / name
    if name.endswith(".txt"):
        path.write_text("\n\n".join(TEXTS * 4) + "\n")
    else:
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 4))
    expected = perplexity(model, tok, path, batch_size=4, progress=False)
    assert expected["tokens"] > model.config.max_seq_len  # more than one window

    run(["eval", "--model", str(folder), "--data", str(path), "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    got = _fields(lines[-1])
    assert got.keys() == {"loss", "ppl", "tokens"}
    assert float(got["loss"]) == pytest.approx(expected["loss"], abs=5e-5)
    assert float(got["ppl"]) == pytest.approx(expected["ppl"], abs=5e-5)
    assert int(got["tokens"]) == expected["tokens"]


def test_eval_multiple_choice_prints_the_accuracy(folder, loaded, tmp_path, capsys):
    model, tok = loaded
    questions = [("Where did the cat sit?", ["on the mat", "in the park", "on a cloud"]),
                 ("Count:", ["1 2 3", "a b c"]),
                 ("A dog", ["ran", "sat", "flew"])]
    best = [max(range(len(cs)), key=choice_logprobs(model, tok, q, cs).__getitem__) for q, cs in questions]
    # the model's own pick is the answer of the first two questions, another choice that of the third
    answers = [best[0], questions[1][1][best[1]], (best[2] + 1) % 3]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps({"question": q, "choices": cs, "answer": a}) + "\n"
                            for (q, cs), a in zip(questions, answers)))
    expected = multiple_choice(model, tok, path, progress=False)
    assert expected["accuracy"] == pytest.approx(2 / 3)

    run(["eval", "--model", str(folder), "--data", str(path), "--device", "cpu"])  # --mode auto: choices
    got = _fields(capsys.readouterr().out.strip().splitlines()[-1])
    assert got.keys() == {"accuracy", "accuracy_norm", "n"}
    assert float(got["accuracy"]) == pytest.approx(2 / 3, abs=5e-5)
    assert float(got["accuracy_norm"]) == pytest.approx(expected["accuracy_norm"], abs=5e-5)
    assert int(got["n"]) == 3


# ---- convert ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["lmforge-folder", "transformers-folder"])
def test_convert_writes_a_folder_lmforge_and_transformers_read_alike(folder, tmp_path, capsys, source):
    import transformers as tf

    if source == "lmforge-folder":
        src = folder
    else:  # a transformers llama (GQA, tied embeddings) with every weight, norms too, away from its init
        src = tmp_path / "hf"
        hf_model("llama-gqa").save_pretrained(src)
    dst = tmp_path / "converted"
    run(["convert", str(src), str(dst)])
    assert capsys.readouterr().out.startswith(f"wrote {dst} (")

    original, tok = lmforge.load(src, device="cpu")
    converted, tok2 = lmforge.load(dst, device="cpu")
    assert json.loads((dst / "config.json").read_text())["model_type"] == "llama"
    assert (tok is None) == (tok2 is None) and (tok is None or tok.hash() == tok2.hash())
    ids = torch.randint(0, original.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    ref = tf.AutoModelForCausalLM.from_pretrained(dst, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = original(ids)
        torch.testing.assert_close(converted(ids), expected, atol=0, rtol=0)
        torch.testing.assert_close(ref(ids).logits, expected, atol=1e-4, rtol=1e-4)


# ---- LoRA fine-tuning and alignment ----------------------------------------------------------------------


def test_lora_sft_then_align_write_an_adapter_and_the_merged_model(folder, tmp_path, capsys):
    """Each LoRA stage writes adapter/ (PEFT layout) and model/ with the adapter merged: the base model with
    the adapter applied gives the merged model's logits. Alignment continues from the SFT adapter."""
    from lmforge.checkpoint.peft import load_adapter

    sft, pairs = tmp_path / "sft.jsonl", tmp_path / "pairs.jsonl"
    sft.write_text("".join(json.dumps({"prompt": t[:8], "response": t[8:]}) + "\n" for t in TEXTS))
    pairs.write_text("".join(json.dumps({"prompt": t[:8], "chosen": t[8:], "rejected": t[8:][::-1]}) + "\n"
                             for t in TEXTS))
    common = ["--model.device", "cpu", "--batch_size", "4", "--micro_batch_size", "2", "--eval_batches", "0",
              "--train.max_steps", "2", "--train.lr", "1e-2", "--train.progress", "false", "--data.max_len", "48"]
    run(["sft", "--out_dir", str(tmp_path / "sft"), "--model.init_from", str(folder), "--data.train", str(sft),
         "--lora.enabled", "true", "--lora.r", "4", *common])
    run(["align", "--out_dir", str(tmp_path / "align"), "--model.init_from", str(folder), "--data.train",
         str(pairs), "--adapter", str(tmp_path / "sft" / "adapter"), *common])
    out = capsys.readouterr().out
    ids = torch.tensor([[5, 9, 2, 7, 3]])
    for stage in ("sft", "align"):
        run_dir = tmp_path / stage
        assert f"wrote {run_dir / 'model'} and {run_dir / 'adapter'}" in out
        base, _ = lmforge.load(folder, device="cpu")
        merged, _ = lmforge.load(run_dir / "model", device="cpu")
        with torch.no_grad():
            torch.testing.assert_close(load_adapter(base, run_dir / "adapter")(ids), merged(ids), atol=1e-5, rtol=1e-5)
            assert not torch.allclose(lmforge.load(folder, device="cpu")[0](ids), merged(ids))  # it trained


# ---- a training run: plot and TensorBoard ----------------------------------------------------------------


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    """Six steps of the training loop with an evaluation every 2 steps, as tests/train/test_loop.py runs it."""
    from lmforge.train.loop import TrainConfig, fit
    from tests.train.test_loop import get_batch, loss_fn, tiny_model

    run_dir = tmp_path_factory.mktemp("run")
    model = tiny_model()
    ids = get_batch(99, 0)

    def evaluate(m):
        loss, _ = loss_fn(m, ids)
        return {"val_loss": float(loss) / ids["n"]}

    cfg = TrainConfig(max_steps=6, lr=1e-2, warmup_steps=2, eval_every=2, progress=False)
    result = fit(model, get_batch, loss_fn, cfg, run_dir, evaluate=evaluate)
    return run_dir, result


def test_plot_writes_a_png_of_the_run(train_run, tmp_path, capsys):
    run_dir, _ = train_run
    records = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in records) == 6 and sum("eval/val_loss" in r for r in records) == 3

    run(["plot", str(run_dir)])
    assert capsys.readouterr().out == f"wrote {run_dir / 'loss.png'}\n"
    png = (run_dir / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000

    out = tmp_path / "elsewhere.png"
    run(["plot", str(run_dir), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_folder_without_metrics_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["plot", str(tmp_path)])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"lmforge: error: {tmp_path / 'metrics.jsonl'}: no metrics.jsonl in this " \
                                      "run folder\n"
    assert not (tmp_path / "loss.png").exists()


def test_training_writes_tensorboard_events_with_the_logged_losses(train_run):
    run_dir, result = train_run
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        pytest.skip("tensorboard is not installed: the event file exists but is not read back")
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    assert {"loss", "lr", "grad_norm", "eval/val_loss"} <= set(acc.Tags()["scalars"])
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in loss] == pytest.approx(result.losses, rel=1e-6)  # stored as float32
    assert [e.step for e in acc.Scalars("eval/val_loss")] == [2, 4, 6]


def test_convert_refuses_a_destination_that_is_not_a_model_folder(folder, tmp_path, capsys):
    from lmforge.cli import main as cli_main

    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        cli_main(["convert", str(folder), str(keep)])
    assert "exists and is not a model folder" in capsys.readouterr().err
    assert (keep / "notes.txt").read_text() == "mine"
    a_file = tmp_path / "file.bin"
    a_file.write_text("data")
    with pytest.raises(SystemExit):
        cli_main(["convert", str(folder), str(a_file)])
    assert "exists and is a file" in capsys.readouterr().err and a_file.read_text() == "data"
    run(["convert", str(folder), str(tmp_path / "m1")])
    run(["convert", str(folder), str(tmp_path / "m1")])  # a model folder is replaced, as lmforge.save does
    assert (tmp_path / "m1" / "config.json").is_file()
