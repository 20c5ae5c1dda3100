"""Bad input on the command line ends in one `lmforge: error:` line naming the option, file or value (exit 2),
before anything is written; and the options that declare what a run is (special tokens, --resume) reach it."""

import shutil

import pytest
import torch

import lmforge
from lmforge.cli import _build, _parser, main
from lmforge.recipes.pretrain import PretrainConfig
from lmforge.tokenizer import Tokenizer, train_tokenizer


def fails(argv, capsys, code=2) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmforge: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_folder):
    """A tiny saved model folder (a copy: tests change it) and a small text file."""
    d = tmp_path_factory.mktemp("cli")
    (d / "c.txt").write_text("".join(f"the cat sat on mat {i} 中文\n" for i in range(60)), encoding="utf-8")
    shutil.copytree(tiny_folder, d / "m")
    return d


@pytest.mark.parametrize("overrides, message", [
    ("{dimm: 64}", "model.overrides: unknown key(s) dimm"),
    ("{n_heads: 3, dim: 48}", "n_heads=3 must be a multiple of n_kv_heads=2"),
])
def test_a_bad_model_block_is_refused_before_the_tokenizer_and_data_are_made(tmp_path, capsys, tiny,
                                                                              overrides, message):
    out = tmp_path / "run"
    err = fails(["pretrain", "--data.sources", f"[{tiny / 'c.txt'}]", "--out_dir", str(out),
                 "--model.overrides", overrides], capsys)
    assert message in err
    assert not out.exists()


def test_eval_names_the_file_and_line_of_undecodable_text_and_the_bad_batch_size(tmp_path, capsys, tiny):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'\xff\xfe{"text": "x"}\n')
    assert f"{bad}:1: invalid UTF-8" in fails(["eval", "--model", str(tiny / "m"), "--data", str(bad)], capsys)
    err = fails(["eval", "--model", str(tiny / "m"), "--data", str(tiny / "c.txt"), "--batch-size", "0"], capsys)
    assert "batch_size must be >= 1, got 0" in err


def test_a_run_stopped_by_a_non_finite_loss_is_one_line_and_status_1(monkeypatch, capsys):
    from lmforge import cli
    from lmforge.train.loop import NonFiniteError

    def run(argv):
        raise NonFiniteError("step 7: the loss is nan; the last checkpoint (step-5) is kept")

    monkeypatch.setattr(cli, "run", run)
    assert "step 7: the loss is nan" in fails(["pretrain"], capsys, code=1)


def test_a_model_input_placement_mixup_is_one_line(monkeypatch, capsys, tiny):
    """A dtype mix-up the user caused (bf16 weights, a float mask passed along) surfaces as PlacementError,
    which the command line prints as one line."""
    from lmforge import cli
    from lmforge.generate import generate
    from lmforge.utils import PlacementError

    model, _ = lmforge.load(tiny / "m")
    model.layers[0].attn.qkv.weight.data = model.layers[0].attn.qkv.weight.data.double()
    with pytest.raises(PlacementError, match="device/dtype mix-up"):
        generate(model, [1, 2, 3], 1)

    def run(argv):
        model(torch.tensor([[1, 2, 3]]))

    monkeypatch.setattr(cli, "run", run)
    assert "device/dtype mix-up" in fails(["generate"], capsys)


def test_a_template_that_refuses_the_messages_is_one_line(tmp_path, capsys, tiny):
    model, tok = lmforge.load(tiny / "m")
    tok.chat_template = "{{ raise_exception('only user turns') }}"
    lmforge.save(model, tok, tmp_path / "m")
    err = fails(["generate", "--model", str(tmp_path / "m"), "--prompt", "hi", "--chat"], capsys)
    assert err == "lmforge: error: chat template: TemplateError: only user turns"


def test_tokenizer_train_declares_its_special_tokens(tmp_path, capsys, tiny):
    out = tmp_path / "tk"
    main(["tokenizer", "train", str(tiny / "c.txt"), "--vocab-size", "300", "--out", str(out),
          "--bos", "<s>", "--add-bos", "--eos", "</s>", "--extra-tokens", "[<tool>, </tool>]"])
    tok = Tokenizer.from_folder(out)
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    ids = tok.encode("the cat <tool>")
    assert ids[0] == tok.bos_id and ids[-1] == tok.backend.token_to_id("<tool>")  # one special id, not pieces
    assert tok.decode(ids, skip_special_tokens=True) == "the cat "
    capsys.readouterr()
    assert "--add-bos needs a bos token" in fails(
        ["tokenizer", "train", str(tiny / "c.txt"), "--out", str(tmp_path / "tk2"), "--add-bos"], capsys)
    assert not (tmp_path / "tk2").exists()


def test_resume_flag_is_train_resume():
    p = _parser()
    for argv, want in ((["--resume"], True), ([], False), (["--train.resume", "true"], True)):
        ns = p.instantiate(p.parse_args(["pretrain", "--data.sources", "[x.txt]", *argv]))
        assert _build(PretrainConfig, ns["pretrain"]).train.resume is want


def test_an_unknown_recipe_key_is_named(tmp_path, capsys, tiny):
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"data:\n  sources: [{tiny / 'c.txt'}]\ntrain:\n  lrr: 0.1\n", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--config", str(cfg), "--out_dir", str(tmp_path / "run")])
    assert e.value.code == 2
    assert "lrr" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_prepare_writes_shards_a_second_run_reuses(tmp_path, capsys, tiny):
    from lmforge.data.prepare import Manifest

    argv = ["prepare", str(tiny / "c.txt"), "--tokenizer", str(tiny / "m"), "--out", str(tmp_path / "data")]
    main(argv)
    first = capsys.readouterr().out
    assert "train and" in first and (tmp_path / "data" / "manifest.json").is_file()
    m = Manifest.load(tmp_path / "data")
    tok = Tokenizer.from_folder(tiny / "m")
    n_docs = 60
    assert m.tokens("train") + m.tokens("val") == sum(len(tok.encode(f"the cat sat on mat {i} 中文")) + 1
                                                      for i in range(n_docs))  # every document + its eos
    main(argv)  # again: same result from the finished shards
    assert capsys.readouterr().out.splitlines()[-1] == first.splitlines()[-1]


@pytest.mark.parametrize("device, message", [
    ("gpu", "device 'gpu' is not a device: use auto, cpu, cuda, cuda:N or mps"),
    ("", "device '' is not a device"),
    ("meta", "device 'meta' holds no data"),
    ("cuda:0", "device 'cuda:0' was asked for but CUDA is not available here" if not torch.cuda.is_available()
     else None),
])
def test_a_bad_device_is_named(capsys, tiny, device, message):
    if message is None:
        pytest.skip("this machine has CUDA")
    assert message in fails(["generate", "--model", str(tiny / "m"), "--prompt", "the", "--device", device], capsys)


@pytest.mark.parametrize("option, value, message", [
    ("--batch_size", "0", "batch_size must be >= 1 and micro_batch_size >= 0"),
    ("--micro_batch_size", "-1", "batch_size must be >= 1 and micro_batch_size >= 0"),
    ("--data.seq_len", "0", "data.seq_len must be >= 1 tokens, got 0"),
    ("--train.log_every", "0", "train.log_every must be >= 1, got 0"),
    ("--train.eval_every", "-5", "train.eval_every must be >= 0, got -5"),
    ("--train.grad_clip", "-1", "train.grad_clip must be >= 0, got -1"),
])
def test_nonsense_numbers_in_a_run_config_are_named_before_anything_is_written(tmp_path, capsys, tiny, option,
                                                                               value, message):
    out = tmp_path / "run"
    err = fails(["pretrain", "--data.sources", f"[{tiny / 'c.txt'}]", "--out_dir", str(out), option, value], capsys)
    assert message in err
    assert not (out / "data").exists() and not (out / "model").exists()


def test_an_output_path_that_is_a_file_or_under_one_is_named(tmp_path, capsys, tiny):
    existing = tmp_path / "existing"
    existing.write_text("keep me")
    err = fails(["tokenizer", "train", str(tiny / "c.txt"), "--vocab-size", "300", "--out", str(existing)], capsys)
    assert err == f"lmforge: error: {existing}: exists and is not a folder"
    err = fails(["prepare", str(tiny / "c.txt"), "--tokenizer", str(tiny / "m"), "--out", str(existing / "d")],
                capsys)
    assert str(existing) in err and "not a folder" in err
    assert existing.read_text() == "keep me"
    err = fails(["tokenizer", "train", str(tiny / "c.txt"), "--vocab-size", "300", "--out", str(tmp_path / "t"),
                 "--min-frequency", "-1"], capsys)
    assert "min_frequency must be >= 0, got -1" in err


def test_undecodable_text_is_a_clear_error_and_the_chat_goes_on(tiny):
    from lmforge.chat import chat_loop

    model, tok = lmforge.load(tiny / "m", device="cpu")
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of Latin-1 bytes typed in a UTF-8 shell
    with pytest.raises(ValueError, match="not valid Unicode: it holds undecodable bytes"):
        tok.encode(bad)
    lines, said = iter([bad, "the cat", "/exit"]), []
    history = chat_loop(model, tok, max_new_tokens=3, read=lambda _: next(lines),
                        write=lambda *a, **k: said.append("".join(map(str, a))))
    assert any("undecodable bytes" in s for s in said)
    assert [m["content"] for m in history if m["role"] == "user"] == ["the cat"]


def test_more_nonsense_values_are_named():
    from lmforge.data.prepare import prepare
    from lmforge.recipes.align import AlignConfig
    from lmforge.recipes.common import LoRASpec
    from lmforge.recipes.sft import ChatData
    from lmforge.tokenizer import SpecialTokens
    from lmforge.train.loop import TrainConfig

    cases = [
        (lambda: AlignConfig(beta=-1.0), "beta must be > 0"),
        (lambda: AlignConfig(label_smoothing=0.7), "label_smoothing must be in [0, 0.5), got 0.7"),
        (lambda: TrainConfig(lr=-1.0), "train.lr must be >= 0"),
        (lambda: TrainConfig(beta2=1.0), "train.beta1 and train.beta2 must be in [0, 1)"),
        (lambda: LoRASpec(dropout=1.5), "lora.dropout must be in [0, 1), got 1.5"),
        (lambda: ChatData(max_len=-3), "data.max_len must be >= 2 tokens, got -3"),
        (lambda: train_tokenizer(["a"], 10**9), "vocab_size 1,000,000,000 is past"),
        (lambda: train_tokenizer(["a"], 300, special_tokens=SpecialTokens(eos="")),
         "special tokens must be non-empty strings"),
        (lambda: prepare([], None, "/nonexistent", workers=0), "workers must be >= 1"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError) as e:
            make()
        assert message in str(e.value), (message, str(e.value))


def test_eval_choices_with_undecodable_text_names_the_line(tmp_path, capsys, tiny):
    bad = tmp_path / "mc.jsonl"
    bad.write_bytes(b'{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "\xff", "choices": ["a", '
                    b'"b"], "answer": 1}\n')
    assert f"{bad}:2: invalid UTF-8" in fails(["eval", "--model", str(tiny / "m"), "--data", str(bad)], capsys)


def test_plot_takes_a_killed_runs_partial_last_line_and_names_a_record_without_step(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    main(["plot", str(run_dir)])
    assert "wrote" in capsys.readouterr().out
    (run_dir / "metrics.jsonl").write_text('{"loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    assert f"{run_dir / 'metrics.jsonl'}:1: a record needs an integer 'step'" in fails(["plot", str(run_dir)], capsys)


def test_ctrl_c_during_a_reply_stops_the_reply_not_the_chat(tiny):
    from lmforge.chat import chat_loop

    model, tok = lmforge.load(tiny / "m", device="cpu")
    lines, said = iter(["the cat", "the mat", "/exit"]), []

    def write(*a, **k):
        if k.get("end") == "" and a and a[0] != " (stopped)" and not any("(stopped)" in s for s in said):
            raise KeyboardInterrupt  # the first streamed piece: as if Ctrl-C came while it was printed
        said.append("".join(map(str, a)))

    history = chat_loop(model, tok, max_new_tokens=3, read=lambda _: next(lines), write=write)
    assert " (stopped)" in said
    assert [m["content"] for m in history if m["role"] == "user"] == ["the cat", "the mat"]


def test_a_run_folder_given_as_the_model_points_at_its_model(tmp_path, capsys, tiny):
    import shutil

    shutil.copytree(tiny / "m", tmp_path / "run" / "model")
    err = fails(["generate", "--model", str(tmp_path / "run"), "--prompt", "the"], capsys)
    assert f"no config.json — not a model folder (a run folder: its model is {tmp_path / 'run' / 'model'})" in err


def test_a_recipe_typo_names_the_file_and_key_in_one_line(tmp_path, capsys):
    recipe = tmp_path / "run.yaml"
    recipe.write_text("out_dir: x\nbatch_sise: 4\ntrain:\n  max_steps: 3\n")
    assert fails(["pretrain", "--config", str(recipe)], capsys) == (
        f"lmforge: error: {recipe}: unknown key 'batch_sise' (did you mean 'batch_size'?)")
    recipe.write_text("out_dir: x\ntrain:\n  max_step: 3\nmodel:\n  overrides: {dim: 64}\n")
    assert fails(["sft", "--config", str(recipe)], capsys) == (
        f"lmforge: error: {recipe}: unknown key 'train.max_step' (did you mean 'train.max_steps'?)")
    recipe.write_text("out_dir: x\ntrain:\n  max_steps: [1\n")
    assert fails(["align", "--config", str(recipe)], capsys).startswith(f"lmforge: error: {recipe}:4: not valid YAML")
    assert fails(["pretrain", "--train.lr=1e-3", "--trian.max_steps", "3"], capsys) == (
        "lmforge: error: option --trian.max_steps: unknown option 'trian.max_steps' (did you mean 'train.max_steps'?)")
    assert not (tmp_path / "x").exists()


def test_what_the_config_and_the_model_settle_is_refused_before_any_data_is_made(tmp_path, capsys, tiny):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat\n\n" * 20)
    out = tmp_path / "run"
    err = fails(["pretrain", "--out_dir", str(out), "--data.sources", f"[{corpus}]", "--data.val_fraction", "0"],
                capsys)
    assert "eval_batches=20 but data.val_fraction is 0" in err
    err = fails(["pretrain", "--out_dir", str(out), "--data.sources", f"[{corpus}]", "--data.seq_len", "65",
                 "--model.init_from", str(tiny / "m")], capsys)
    assert err.endswith(f"data.seq_len=65 is longer than the context of {tiny / 'm'} (64 tokens)")
    assert not (out / "data").exists() and not (out / "tokenizer").exists()


def test_prepare_warns_when_the_validation_split_is_empty(tmp_path, caplog, tiny_tokenizer):
    from lmforge.data.prepare import prepare

    (tmp_path / "one.txt").write_text("a single document\n")
    with caplog.at_level("WARNING"):
        prepare([tmp_path / "one.txt"], tiny_tokenizer, tmp_path / "d", val_fraction=0.01, workers=1, progress=False)
    assert "the validation split of" in caplog.text and "is empty" in caplog.text


@pytest.mark.parametrize("options, message", [
    (["--lora.enabled", "true", "--lora.targets", "[qkv, qvk]"],
     "lora.targets ['qvk'] match no linear layer of the model; its layers are qkv, out, gate_up, down"),
    (["--lora.enabled", "true", "--lora.targets", "['(']"], "lora.targets: '(' is neither a layer name nor a valid regex"),
    (["--adapter", "no/such/adapter"], "adapter no/such/adapter: no adapter_config.json there"),
])
def test_lora_settings_are_checked_before_the_data_is_read(tmp_path, capsys, tiny, options, message):
    out = tmp_path / "run"  # the data file does not exist: its error would come first if the data were read first
    err = fails(["sft", "--out_dir", str(out), "--model.init_from", str(tiny / "m"),
                 "--data.train", str(tmp_path / "missing.jsonl"), *options], capsys)
    assert message in err
    assert not (out / "checkpoints").exists()
