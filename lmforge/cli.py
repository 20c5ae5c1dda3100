"""The command line: `lmforge <command> --help` shows every option with its meaning.

Recipe commands (pretrain, sft, align) read a YAML file with `--config` and take any key on the command
line (`--train.lr 1e-3`); unknown keys are an error. Expected failures (bad files, bad options) print one
line naming the file or option and exit with status 2 — never a traceback from deep inside torch."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser


def _recipe_parser(cls: type, description: str) -> ArgumentParser:
    p = ArgumentParser(description=description, default_env=False)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML recipe; later options override it")
    p.add_class_arguments(cls, fail_untyped=True)
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in out_dir (same as --train.resume true)")
    return p


def _build(cls: type, ns: Any) -> Any:
    """The recipe dataclass from a parsed (already instantiated) namespace."""
    cfg = cls(**{f.name: ns[f.name] for f in dataclasses.fields(cls) if f.name in ns})
    if ns.get("resume"):
        cfg.train.resume = True
    return cfg


def _parser() -> ArgumentParser:
    from lmforge.recipes.pretrain import PretrainConfig
    from lmforge.recipes.quickstart import State as Quickstart

    root = ArgumentParser(prog="lmforge", description="Train, fine-tune, align and run decoder-only language models.")
    sub = root.add_subcommands(dest="command")

    q = ArgumentParser(description="The whole path on an embedded corpus, on CPU, in a few minutes.")
    q.add_argument("--out", default="runs/quickstart", help="run folder")
    q.add_argument("--steps", type=int, default=Quickstart.steps, help="pretraining steps")
    q.add_argument("--sft-steps", type=int, default=Quickstart.sft_steps, help="fine-tuning steps")
    q.add_argument("--align-steps", type=int, default=Quickstart.align_steps, help="DPO steps")
    q.add_argument("--device", default="auto", help="auto, cpu or cuda")
    sub.add_subcommand("quickstart", q, help="tokenizer -> pretrain -> samples -> SFT -> DPO -> chat on an embedded corpus")

    sub.add_subcommand("pretrain", _recipe_parser(PretrainConfig, "Pretrain from scratch or continue from a "
                                                  "checkpoint."), help="pretrain or continue pretraining")
    for name, _module, cls, text in _later_recipes():
        sub.add_subcommand(name, _recipe_parser(cls, text), help=text)

    tok = ArgumentParser(description="Tokenizers.")
    sub.add_subcommand("tokenizer", tok, help="train a tokenizer")
    tsub = tok.add_subcommands(dest="action")
    tt = ArgumentParser(description="Train a byte-level BPE tokenizer on .txt/.jsonl/.parquet files.")
    tt.add_argument("files", nargs="+", help="files, globs or folders")
    tt.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size, special tokens included")
    tt.add_argument("--out", required=True, help="folder for tokenizer.json + tokenizer_config.json")
    tt.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge")
    tt.add_argument("--eos", default="<|im_end|>", help="end-of-text token (also ends a chat turn)")
    tt.add_argument("--bos", default=None, help="beginning-of-text token, e.g. '<s>' (default: none)")
    tt.add_argument("--add-bos", action="store_true", help="prepend bos when encoding (needs --bos)")
    tt.add_argument("--pad", default="<|pad|>", help="padding token")
    tt.add_argument("--extra-tokens", type=list[str], default=[], help="more special tokens, e.g. '[<tool>]'")
    tsub.add_subcommand("train", tt, help="train a tokenizer")

    pr = ArgumentParser(description="Tokenize a corpus once into token shards with a manifest.")
    pr.add_argument("sources", nargs="+", help="files, globs or folders (.txt, .jsonl, .parquet)")
    pr.add_argument("--tokenizer", required=True, help="a folder with tokenizer.json, or a model folder")
    pr.add_argument("--out", required=True, help="output folder (re-running skips complete shards)")
    pr.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out")
    pr.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    pr.add_argument("--skip-bad-lines", action="store_true", help="count and skip bad lines instead of stopping")
    sub.add_subcommand("prepare", pr, help="tokenize a corpus into token shards")

    cv = ArgumentParser(description="Convert any checkpoint lmforge reads into a Hugging Face folder, or into a "
                                    "GGUF file that llama.cpp runs (a destination ending in .gguf).")
    cv.add_argument("src", help="HF folder, lmforge folder or .gguf file")
    cv.add_argument("dst", help="output folder, or a .gguf file")
    cv.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    cv.add_argument("--outtype", default=None,
                    help="for a .gguf destination: f32, f16, bf16 or q8_0 (default f16), as llama.cpp's converter")
    sub.add_subcommand("convert", cv, help="convert a checkpoint (GGUF <-> HF safetensors)")

    g = ArgumentParser(description="Generate a continuation of a prompt.")
    _model_args(g)
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _sampling_args(g)
    g.add_argument("--stream", action="store_true", help="print tokens as they come")
    sub.add_subcommand("generate", g, help="generate text from a prompt")

    c = ArgumentParser(description="Chat in the terminal; /reset clears the history, /exit ends.")
    _model_args(c)
    c.add_argument("--system", default=None, help="a system prompt")
    _sampling_args(c)
    sub.add_subcommand("chat", c, help="multi-turn chat in the terminal")

    e = ArgumentParser(description="Perplexity on a text/jsonl file, or multiple-choice accuracy.")
    _model_args(e)
    e.add_argument("--data", required=True, help=".txt/.jsonl (perplexity) or .jsonl with question/choices/answer")
    e.add_argument("--mode", default="auto", choices=["auto", "perplexity", "choice"], help="what to measure")
    e.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    sub.add_subcommand("eval", e, help="perplexity or multiple-choice accuracy")

    pl = ArgumentParser(description="Draw a run's loss curves (metrics.jsonl) to a PNG.")
    pl.add_argument("run_dir", help="a run folder with metrics.jsonl")
    pl.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/loss.png)")
    sub.add_subcommand("plot", pl, help="plot loss curves")
    return root


def _later_recipes() -> list[tuple[str, str, type, str]]:
    """Recipe commands whose modules exist in this version (sft, align)."""
    out = []
    for name, module, cls_name, text in (
        ("sft", "lmforge.recipes.sft", "SFTConfig", "Supervised fine-tuning on Q&A, full or LoRA."),
        ("align", "lmforge.recipes.align", "AlignConfig", "Preference alignment: DPO, IPO, SimPO, ORPO."),
    ):
        try:
            mod = __import__(module, fromlist=[cls_name])
        except ImportError:
            continue
        out.append((name, module, getattr(mod, cls_name), text))
    return out


def _model_args(p: ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF folder, lmforge run output, or .gguf file")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: as stored)")


def _sampling_args(p: ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many new tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (argmax)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample within this probability mass")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token decode step")


def _sampling(a: Any) -> dict[str, Any]:
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.seed, compile=a.compile)


def _load(a: Any):
    from lmforge.checkpoint import load

    model, tokenizer = load(a.model, device=a.device, dtype=a.dtype)
    if tokenizer is None:
        raise ValueError(f"{a.model}: no tokenizer.json — generation needs the model's tokenizer")
    return model, tokenizer


def run(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.instantiate(parser.parse_args(argv))
    cmd = args.command
    a = args[cmd]
    if cmd == "quickstart":
        from lmforge.recipes.quickstart import run as quickstart

        quickstart(a.out, steps=a.steps, device=a.device, sft_steps=a.sft_steps, align_steps=a.align_steps)
    elif cmd == "pretrain":
        from lmforge.recipes.pretrain import PretrainConfig
        from lmforge.recipes.pretrain import run as pretrain

        pretrain(_build(PretrainConfig, a))
    elif cmd in ("sft", "align"):
        for name, module, cls, _ in _later_recipes():
            if name == cmd:
                __import__(module, fromlist=["run"]).run(_build(cls, a))
    elif cmd == "tokenizer":
        from lmforge.data.documents import iter_texts
        from lmforge.tokenizer import SpecialTokens, train_tokenizer

        t = a.train
        if t.add_bos and not t.bos:
            raise ValueError("--add-bos needs a bos token: give --bos (e.g. --bos '<s>')")
        specials = SpecialTokens(eos=t.eos, pad=t.pad, bos=t.bos, extra=tuple(t.extra_tokens))
        tok = train_tokenizer(iter_texts(t.files), t.vocab_size, min_frequency=t.min_frequency,
                              special_tokens=specials, add_bos=t.add_bos)
        tok.save(t.out)
        print(f"wrote {t.out} ({tok.vocab_size} tokens)")
    elif cmd == "prepare":
        from lmforge.data.prepare import prepare
        from lmforge.tokenizer import Tokenizer

        m = prepare(a.sources, Tokenizer.from_folder(a.tokenizer), a.out, val_fraction=a.val_fraction,
                    workers=a.workers, skip_bad_lines=a.skip_bad_lines)
        print(f"wrote {a.out}: {m.tokens('train'):,} train and {m.tokens('val'):,} val tokens")
    elif cmd == "convert":
        from lmforge.checkpoint import load, save

        to_gguf = a.dst.lower().endswith(".gguf")
        if a.outtype is not None and not to_gguf:
            raise ValueError(f"--outtype {a.outtype} is for a .gguf destination; {a.dst} is a folder (use --dtype)")
        if to_gguf and a.dtype is not None:
            raise ValueError("--dtype is for a folder destination; a .gguf one takes --outtype (f32, f16, bf16, q8_0)")
        dst = Path(a.dst)
        if dst.is_file() and not to_gguf:
            raise ValueError(f"{dst}: exists and is a file; the destination is a new or a model folder")
        if dst.is_dir() and not to_gguf and any(dst.iterdir()) and not (dst / "config.json").is_file():
            raise ValueError(f"{dst}: exists and is not a model folder (no config.json); converting there would "
                             "replace what it holds: choose a new destination")
        if to_gguf:
            from lmforge.checkpoint.gguf import OUTTYPES, write_gguf

            outtype = a.outtype or "f16"
            if outtype not in OUTTYPES:  # before the (slow) load
                raise ValueError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
        model, tokenizer = load(a.src, device="cpu", dtype=None if to_gguf else a.dtype)
        if to_gguf:
            if tokenizer is None:
                raise ValueError(f"{a.src}: no tokenizer.json; a GGUF file holds the tokenizer too")
            write_gguf(model, tokenizer, a.dst, outtype)
        else:
            save(model, tokenizer, a.dst)
        print(f"wrote {a.dst} ({model.num_params():,} parameters)")
    elif cmd == "generate":
        from lmforge.generate import generate, stream

        model, tok = _load(a)
        ids = tok.apply_chat_template([{"role": "user", "content": a.prompt}], add_generation_prompt=True,
                                      tokenize=True) if a.chat else tok.encode(a.prompt)  # the template has its bos
        if a.stream:
            for piece in stream(model, tok, ids, **_sampling(a)):
                print(piece, end="", flush=True)
            print()
        else:
            print(tok.decode(generate(model, [ids], tokenizer=tok, **_sampling(a))[0], skip_special_tokens=True))
    elif cmd == "chat":
        from lmforge.chat import chat_loop

        model, tok = _load(a)
        chat_loop(model, tok, system=a.system, **_sampling(a))
    elif cmd == "eval":
        from lmforge.evaluate import multiple_choice, perplexity

        model, tok = _load(a)
        mode = a.mode
        if mode == "auto":
            mode = "choice" if _looks_like_choices(a.data) else "perplexity"
        result = multiple_choice(model, tok, a.data) if mode == "choice" else \
            perplexity(model, tok, a.data, batch_size=a.batch_size)
        print("  ".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in result.items()))
    elif cmd == "plot":
        out = plot(a.run_dir, a.out)
        print(f"wrote {out}")


def _looks_like_choices(path: str) -> bool:
    import json

    if not path.endswith(".jsonl"):
        return False
    try:
        with open(path, "rb") as f:  # the first line only: a bad byte further on is the reader's to report
            first = next((line for line in f if line.strip()), b"{}")
        return "choices" in json.loads(first.decode("utf-8", "replace"))
    except (json.JSONDecodeError, UnicodeDecodeError):  # the data reader reports it with file and line
        return False


def plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Training loss (and validation loss where logged) against step, from metrics.jsonl, as a PNG."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics.jsonl in this run folder")
    train, val = [], []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # a run killed while writing leaves a partial last line: plot what is whole
                break
            raise ValueError(f"{path}:{n}: not valid JSON") from None
        if not isinstance(r, dict) or not isinstance(r.get("step"), int):
            raise ValueError(f"{path}:{n}: a record needs an integer 'step'")
        if "loss" in r:
            train.append((r["step"], r["loss"]))
        if "eval/val_loss" in r:
            val.append((r["step"], r["eval/val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(str(run_dir))
    ax.legend()
    ax.grid(alpha=0.3)
    out = Path(out) if out else Path(run_dir) / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    import jinja2

    from lmforge.checkpoint import CheckpointError
    from lmforge.config import ConfigError
    from lmforge.train.distributed import DistributedError, shutdown
    from lmforge.train.loop import NonFiniteError
    from lmforge.utils import PlacementError

    try:
        run(argv)
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError, KeyError, PlacementError) as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError) as e:  # a path of the user's
        what = {FileExistsError: "exists and is not a folder", IsADirectoryError: "is a folder, not a file",
                NotADirectoryError: "a part of this path is a file, not a folder",
                PermissionError: "permission denied"}[type(e)]
        print(f"lmforge: error: {e.filename}: {what}", file=sys.stderr)
        sys.exit(2)
    except jinja2.TemplateError as e:  # the model's chat template is broken or refuses these messages
        print(f"lmforge: error: chat template: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:  # the run stopped; its last good checkpoint is untouched
        print(f"lmforge: error: {e}", file=sys.stderr)
        sys.exit(1)
    except DistributedError as e:  # another process died or hung (under torchrun)
        print(f"lmforge: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    shutdown()  # end the process group of a torchrun run (a no-op otherwise)


if __name__ == "__main__":
    main()
