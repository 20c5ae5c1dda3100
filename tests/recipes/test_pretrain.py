"""Continued pretraining: the pretrain recipe with `model.init_from` starts from the saved model's weights and
tokenizer, trains a few steps on a small corpus, and writes a model folder that lmforge and `transformers`
read to the same logits."""

from __future__ import annotations

import json

import pytest
import torch

import lmforge
from lmforge.data.pretrain import PackedDataset
from lmforge.recipes.common import ModelSpec
from lmforge.recipes.pretrain import PretrainConfig, PretrainData, run
from lmforge.tokenizer import train_tokenizer
from lmforge.train.loop import TrainConfig

SEQ_LEN, BATCH, STEPS = 32, 4, 3
DOCS = [f"Document {i}: the {animal} number {i % 7} sat on the {thing}." for i in range(120)
        for animal, thing in [(("cat", "dog", "bird")[i % 3], ("mat", "log", "roof")[i % 3])]]


@pytest.fixture(scope="module")
def continued(tmp_path_factory):
    """(init folder, the init model, the run folder, the fit result) of a 3-step continued pretraining run."""
    root = tmp_path_factory.mktemp("continued")
    tok = train_tokenizer(DOCS, 300)
    torch.manual_seed(7)  # not the run's seed (0): a model built afresh by the recipe would differ
    config = lmforge.ModelConfig.from_preset("tiny-llama", vocab_size=tok.vocab_size, dim=32, n_layers=2,
                                             n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64, init_std=0.1)
    init = lmforge.save(lmforge.Transformer(config), tok, root / "init")
    (root / "corpus.txt").write_text("\n\n".join(DOCS) + "\n")
    cfg = PretrainConfig(
        out_dir=str(root / "run"), model=ModelSpec(init_from=str(init), device="cpu"), batch_size=BATCH,
        eval_batches=0, data=PretrainData(sources=[str(root / "corpus.txt")], seq_len=SEQ_LEN, val_fraction=0.0),
        train=TrainConfig(max_steps=STEPS, lr=1e-2, warmup_steps=1, progress=False),
    )
    result = run(cfg)
    model, _ = lmforge.load(init, device="cpu")
    return init, model, root / "run", result, cfg


def test_the_run_finishes_and_uses_the_init_tokenizer(continued):
    init, _, out, result, _ = continued
    assert result.step == STEPS and len(result.losses) == STEPS
    records = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert not (out / "tokenizer").exists()  # no tokenizer trained: the checkpoint's is used
    _, tok = lmforge.load(out / "model", device="cpu")
    _, init_tok = lmforge.load(init, device="cpu")
    assert tok.hash() == init_tok.hash()


def test_training_starts_from_the_init_weights(continued):
    """The first step's loss (taken before any update) is the init model's loss on the first batch, not that
    of a fresh model of the same config."""
    _, init_model, out, result, cfg = continued
    x, y = PackedDataset(out / "data", "train", SEQ_LEN).batch(0, BATCH, cfg.train.seed)
    with torch.no_grad():
        total, n = init_model(x, labels=y)
        init_loss = float(total / n)
        torch.manual_seed(123)
        fresh = lmforge.Transformer(init_model.config)
        total, n = fresh(x, labels=y)
        fresh_loss = float(total / n)
    assert result.losses[0] == pytest.approx(init_loss, rel=1e-5)
    assert abs(fresh_loss - init_loss) > 1e-3  # so the check above tells the two apart


def test_final_model_loads_in_lmforge_and_transformers_alike(continued):
    import transformers as tf

    init, init_model, out, _, _ = continued
    model, _ = lmforge.load(out / "model", device="cpu")
    assert model.config == init_model.config
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, init_model.state_dict()[k])]
    assert moved  # training changed the weights
    ref = tf.AutoModelForCausalLM.from_pretrained(out / "model", attn_implementation="eager").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(ids)
        torch.testing.assert_close(ref(ids).logits, logits, atol=1e-4, rtol=1e-4)
        assert (logits - init_model(ids)).abs().max() > 1e-4


def test_a_finished_run_is_not_overwritten_without_resume(continued, capsys):
    """Running again into a folder that holds a run is refused before anything of it changes."""
    from lmforge.cli import main

    _, _, out, _, cfg = continued
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--out_dir", str(out), "--model.init_from", cfg.model.init_from,
              "--data.sources", f"[{cfg.data.sources[0]}]", "--data.seq_len", str(SEQ_LEN), "--eval_batches", "0",
              "--batch_size", str(BATCH), "--train.max_steps", "1"])
    assert e.value.code == 2
    assert f"{out}: already holds a run (checkpoints up to step-{STEPS}): pass --resume" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_prepared_data_of_another_tokenizer_is_refused(continued, tmp_path):
    _, _, out, _, cfg = continued
    other = train_tokenizer(DOCS[::-1], 280)
    other.save(tmp_path / "tok")
    bad = PretrainConfig(out_dir=str(tmp_path / "run"), model=cfg.model, batch_size=BATCH, eval_batches=0,
                         data=PretrainData(prepared=str(out / "data"), tokenizer=str(tmp_path / "tok"),
                                           seq_len=SEQ_LEN), train=TrainConfig(max_steps=1, progress=False))
    with pytest.raises(ValueError, match=f"data.prepared {out / 'data'} was made with another tokenizer"):
        run(bad)
    assert not (tmp_path / "run" / "model").exists()


def test_resume_keeps_the_run_tokenizer(tmp_path):
    """A resumed run reads the tokenizer it trained; it does not train (and write) a new one first."""
    (tmp_path / "c.txt").write_text("\n\n".join(DOCS) + "\n")
    cfg = PretrainConfig(out_dir=str(tmp_path / "run"), model=ModelSpec(preset="tiny-llama", device="cpu",
                         overrides={"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64}),
                         batch_size=BATCH, eval_batches=0,
                         data=PretrainData(sources=[str(tmp_path / "c.txt")], vocab_size=300, seq_len=SEQ_LEN,
                                           val_fraction=0.0),
                         train=TrainConfig(max_steps=2, stop_at=1, lr=1e-2, warmup_steps=1, progress=False))
    run(cfg)
    tok_file = tmp_path / "run" / "tokenizer" / "tokenizer.json"
    stamp = tok_file.stat().st_mtime_ns
    cfg.train.resume = True
    cfg.train.stop_at = 0
    result = run(cfg)
    assert result.step == 2 and tok_file.stat().st_mtime_ns == stamp
