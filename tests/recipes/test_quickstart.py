"""The README's main command, end to end at a few steps per stage: every stage runs, hands its model to the
next, and the last model folder loads and generates, also after the suggested conversion to GGUF."""

import json
import shutil

import pytest
import torch

from lmforge.checkpoint import load
from lmforge.cli import run as cli
from lmforge.generate import generate


def test_quickstart_runs_every_stage_and_leaves_a_loadable_model(tmp_path, capsys):
    out = tmp_path / "qs"
    cli(["quickstart", "--out", str(out), "--steps", "30", "--sft-steps", "8", "--align-steps", "4", "--device", "cpu"])
    text = capsys.readouterr().out

    summary = text.split("== quickstart summary ==")[1]
    for stage in ("corpus", "tokenizer + pretrain", "samples", "SFT", "align (DPO)", "chat"):
        assert f"  {stage} " in summary, stage
    assert "20,000 documents" in summary and "(held-out)" in summary

    # pretraining learned something in 30 steps: the loss of the last steps is well below the first
    rows = [json.loads(line) for line in open(out / "pretrain" / "metrics.jsonl", encoding="utf-8")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < losses[0] - 1.0
    assert any("eval/val_ppl" in r for r in rows)

    # each stage wrote a model folder; the last (aligned) one loads and continues a prompt
    for stage in ("pretrain", "sft", "align"):
        assert (out / stage / "model" / "config.json").is_file(), stage
    model, tok = load(out / "align" / "model")
    ids = torch.tensor([tok.encode("13+6=")])
    assert torch.isfinite(model(ids)).all()
    assert "model folder:" in text and str(out / "align" / "model") in text

    # and it leaves for llama.cpp: the command the summary suggests writes a GGUF that generates the same tokens
    suggested = text.split("for llama.cpp: ")[1].split(")")[0].split()
    assert suggested[:2] == ["lmforge", "convert"]
    cli([*suggested[1:], "--outtype", "f32"])
    from_gguf, tok2 = load(out / "model.gguf")
    prompt = tok.encode("13+6=")
    assert generate(from_gguf, [prompt], 6, tokenizer=tok2) == generate(model, [prompt], 6, tokenizer=tok)

    # run again: every stage is done and skipped
    args = ["quickstart", "--out", str(out), "--steps", "30", "--sft-steps", "8", "--align-steps", "4", "--device", "cpu"]
    capsys.readouterr()
    cli(args)
    again = capsys.readouterr().out
    assert again.count("done by an earlier run") == 6 and "(earlier run)" in again.split("summary")[1]


@pytest.mark.slow  # three quickstarts at a few steps (the alignment stage samples the SFT model's answers)
def test_a_quickstart_redoes_a_stage_whose_output_is_gone_and_fresh_starts_over(tmp_path, capsys):
    out = tmp_path / "qs"
    args = ["quickstart", "--out", str(out), "--steps", "30", "--sft-steps", "8", "--align-steps", "4", "--device", "cpu"]
    cli(args)
    capsys.readouterr()
    shutil.rmtree(out / "sft" / "model")
    cli(args)
    again = capsys.readouterr().out
    skipped = [line.split(" ==")[0].removeprefix("== ") for line in again.splitlines() if "done by an earlier" in line]
    assert skipped == ["corpus", "tokenizer + pretrain", "samples"]
    assert (out / "sft" / "model" / "config.json").is_file() and "== align (DPO) ==" in again
    cli([*args, "--fresh"])  # starts over: nothing skipped
    assert "done by an earlier run" not in capsys.readouterr().out


@pytest.mark.parametrize("option", ["--steps", "--sft-steps", "--align-steps"])
def test_quickstart_refuses_a_step_count_below_one_before_any_stage(tmp_path, option):
    with pytest.raises(ValueError, match=f"quickstart {option} must be >= 1, got 0"):
        cli(["quickstart", "--out", str(tmp_path / "qs"), option, "0"])
    assert not (tmp_path / "qs").exists()  # nothing started


REDUCED = dict(steps=700, sft_steps=200, align_steps=120)  # the default run's stages, shorter (DPO: half the
# steps, so half the sampled answers: 421 training questions, 82 held-out ones)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The corpus and one pretrained model, shared by the seeds of the fine-tuning stages."""
    from lmforge.recipes.quickstart import State, stage_corpus, stage_pretrain

    s = State(tmp_path_factory.mktemp("qs"), "cpu", **REDUCED)
    stage_corpus(s)
    stage_pretrain(s)
    return s


@pytest.mark.slow  # pretraining at a reduced size, then SFT, on-policy sampling and DPO 3 times: 651 s on the
# shared 2-core machine at load 5 (OMP_NUM_THREADS=1; pretraining 411 s of it)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_stage_moves_its_metric_the_right_way_on_held_out_data(pretrained, tmp_path, seed):
    from lmforge.recipes.quickstart import State, stage_align, stage_sft

    assert pretrained.extra["pretrain_ppl"] < 5  # from ~430 untrained; 2.30 here
    s = State(tmp_path, "cpu", **REDUCED, seed=seed, model_dir=pretrained.model_dir, extra=dict(pretrained.extra))
    stage_sft(s)
    assert s.extra["sft_acc"] >= 0.1  # from 0% (untuned, it continues the chat template); seeds 0-2: 21-22%
    stage_align(s)
    before, after = s.extra["align_pref_acc"]
    assert after >= before + 0.03  # DPO prefers the right answer to its own wrong ones more often (+4.7 to +15 points)
    assert s.extra["align_acc"] >= s.extra["sft_acc"]  # and answers at least as well as after SFT (+2.4 to +7.9)


def test_the_alignment_stage_samples_in_proportion_to_its_steps():
    from lmforge.data.demo_tasks import held_out_pairs
    from lmforge.recipes.quickstart import ALIGN_PROMPTS, State, align_questions

    train, held = align_questions(State.align_steps)  # the default run: every drawn question, all held-out ones
    assert len(train) > 0.7 * ALIGN_PROMPTS and held == held_out_pairs()
    small, few = align_questions(4)  # the default test's run: a few dozen questions, an even spread held out
    assert 16 <= len(small) <= 40 and len(few) == 16 and len({r["prompt"] for r in few}) == 16
    assert {r["prompt"] for r in small} <= {r["prompt"] for r in train}
    assert sum("帮我计算" in r["prompt"] for r in few) >= 4  # every phrasing, not the first questions only


def test_the_checker_judges_answers_in_the_prompts_phrasing_and_free_continuations():
    from lmforge.data.demo_tasks import check, sft_pairs

    assert all(check(r["prompt"], r["response"]) for r in sft_pairs(200, seed=0, split="val"))
    assert check("帮我计算12+7的结果", "等于19") and not check("帮我计算12+7的结果", "19")  # the phrasing SFT teaches
    assert check("What is 15-9?", " 6") and not check("What is 15-9?", "11") and not check("What is 15-9?", "")
    assert check("Alice has 5 apples and gets 3.", " Now Alice has 8 apples.", exact=False)
    assert not check("13+6=", "17", exact=False) and not check("hello", "1")
