"""Tokenizer: a `tokenizers.Tokenizer` plus its special tokens and chat template.

Convention: one end token. `eos` ("<|im_end|>" by default) ends every pretraining document AND
every chat turn (ChatML: `<|im_start|>role\\ncontent<|im_end|>\\n`), so `Tokenizer.eos_id` is the
single token that pretraining packs between documents, that SFT trains the answer to end with,
and that generation stops on. Folders from elsewhere keep their own `eos_token`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

_MAX_VOCAB = 1 << 20


@dataclass(frozen=True)
class SpecialTokens:
    """The special tokens of a trained tokenizer; `eos` ends documents and chat turns alike."""

    eos: str = "<|im_end|>"
    im_start: str = "<|im_start|>"
    pad: str | None = "<|pad|>"
    bos: str | None = None
    extra: tuple[str, ...] = ()

    def all(self) -> list[str]:
        """Every special token, in the order they get ids (0, 1, ...)."""
        toks = [self.eos, self.im_start, self.pad, self.bos, *self.extra]
        return list(dict.fromkeys(t for t in toks if t is not None))


def chatml_template(im_start: str = "<|im_start|>", im_end: str = "<|im_end|>") -> str:
    """The ChatML template; the turn end is `im_end`, which is our eos."""
    return (
        "{% for message in messages %}"
        f"{{{{ '{im_start}' + message['role'] + '\\n' + message['content'] + '{im_end}' + '\\n' }}}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ '{im_start}assistant\\n' }}}}{{% endif %}}"
    )


class _GenerationTag(jinja2.ext.Extension):
    """Accepts HF's `{% generation %}...{% endgeneration %}` marker and renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile_template(template: str) -> jinja2.Template:
    """Compile a chat template in the same sandbox, with the same globals, as `transformers`."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _token_str(value: Any) -> str | None:
    """HF configs give special tokens as strings or as `{"content": ...}` dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read tokenizer file: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` with the special tokens and the chat template."""

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token: str | None,
        eos_token: str,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        add_bos: bool = False,
        model_max_length: int | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.model_max_length = model_max_length
        self.eos_id = self._id(eos_token)
        self.bos_id = self._id(bos_token) if bos_token is not None else None
        self.pad_id = self._id(pad_token) if pad_token is not None else self.eos_id
        self.unk_id = self._id(unk_token) if unk_token is not None else None
        if add_bos and self.bos_id is None:
            raise ValueError("add_bos=True needs a bos_token")

    def _id(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise ValueError(f"special token {token!r} is not in the vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding must be at least this big)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                 "unk_token": self.unk_token}
        return {k: v for k, v in names.items() if v is not None}

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Text → ids; prepends bos when `add_bos` (default: the tokenizer's setting). Never adds eos."""
        try:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        except TypeError:  # tokenizers' message for a str holding lone surrogates: "must be str"
            if not isinstance(text, str):
                raise
            raise ValueError("the text is not valid Unicode: it holds undecodable bytes (is the input UTF-8?)") \
                from None
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once on the Rust thread pool (`encode_batch_fast`: no offsets computed); same ids as
        `encode` one by one."""
        out = [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        if self.add_bos and self.bos_id is not None:
            out = [[self.bos_id, *ids] for ids in out]
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids (a list, numpy array or tensor) → text; `decode(encode(s)) == s` for every string."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = False, tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the chat template (the one implementation used everywhere).

        Same sandbox and variables as `transformers` (special tokens, `raise_exception`, extra kwargs such as
        `tools`); with `tokenize=True` the text is encoded without adding bos (templates add it themselves).
        """
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        text = _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            **{"tools": None, "documents": None, **self.special_tokens_map, **kwargs},
        )
        return self.encode(text, add_bos=False) if tokenize else text

    def hash(self) -> str:
        """Stable sha256 of the vocabulary/merges/pipeline and the specials; data manifests record it."""
        specials = json.dumps([self.bos_token, self.eos_token, self.pad_token, self.unk_token, self.add_bos])
        return hashlib.sha256((self.backend.to_str() + "\n" + specials).encode()).hexdigest()

    def save(self, folder: str | Path) -> None:
        """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` (HF layout)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **{k: getattr(self, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": self.chat_template,
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        (folder / "special_tokens_map.json").write_text(json.dumps(self.special_tokens_map, indent=2) + "\n",
                                                      encoding="utf-8")

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """Load an HF tokenizer folder (`tokenizer.json` + `tokenizer_config.json`, chat template inline or
        in `chat_template.jinja` / `chat_template.json`)."""
        folder = Path(folder)
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise ValueError(f"{tj}: missing (a tokenizer folder needs tokenizer.json)")
        try:
            backend = Backend.from_file(str(tj))
        except Exception as e:  # the Rust loader raises a bare Exception
            raise ValueError(f"{tj}: cannot load: {e}") from e
        cfg_path = folder / "tokenizer_config.json"
        if not cfg_path.is_file():
            raise ValueError(f"{cfg_path}: missing (it names eos_token and the chat template)")
        cfg = _read_json(cfg_path)
        stm_path = folder / "special_tokens_map.json"
        specials = {**(_read_json(stm_path) if stm_path.is_file() else {}), **cfg}
        tok = {k: _token_str(specials.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        if tok["eos_token"] is None:
            raise ValueError(f"{cfg_path}: no eos_token")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # HF's named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if (folder / "chat_template.json").is_file():
            template = _read_json(folder / "chat_template.json").get("chat_template", template)
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        bos_id = backend.token_to_id(tok["bos_token"]) if tok["bos_token"] else None
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:  # not stated: add bos iff the folder's post-processor does
            add_bos = bos_id is not None and backend.encode("a").ids[:1] == [bos_id]
        add_bos = bool(add_bos) and bos_id is not None
        max_len = cfg.get("model_max_length")
        try:
            return cls(backend, **tok, chat_template=template, add_bos=add_bos,
                       model_max_length=max_len if isinstance(max_len, int) else None)
        except ValueError as e:
            raise ValueError(f"{cfg_path}: {e}") from e


def train_tokenizer(
    documents: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    special_tokens: SpecialTokens | None = None,
    add_bos: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `documents` (texts; read once, so a generator is fine).

    To train on files, pass `lmforge.data.documents.iter_texts(sources)`, which reads them as `lmforge prepare`
    does. GPT-2 regex pre-tokenizer, digits split one by one, all 256 bytes in the alphabet (any string encodes;
    no unk token), no normalizer (lossless). `add_bos` needs `special_tokens.bos`; it also goes into
    tokenizer.json's post-processor so that tools reading only that file add bos too.
    """
    if isinstance(documents, (str, bytes, os.PathLike)):  # iterating it would train on its characters
        raise TypeError("train_tokenizer takes an iterable of texts, not one text or path; read files with "
                        "lmforge.data.documents.iter_texts")
    sp = special_tokens or SpecialTokens()
    if min_frequency < 0:
        raise ValueError(f"min_frequency must be >= 0, got {min_frequency}")
    if vocab_size > _MAX_VOCAB:
        raise ValueError(f"vocab_size {vocab_size:,} is past {_MAX_VOCAB:,}, far more than any model uses "
                         "(LLaMA-3: 128,256)")
    if any(not t for t in sp.all()) or sp.eos is None:
        raise ValueError(f"special tokens must be non-empty strings, got {[sp.eos, sp.pad, sp.bos, *sp.extra]}")
    n_base = len(pre_tokenizers.ByteLevel.alphabet()) + len(sp.all())
    if vocab_size < n_base:
        raise ValueError(f"vocab_size {vocab_size} < 256 bytes + {len(sp.all())} special tokens")
    backend = Backend(models.BPE())  # no unk: every byte is in the alphabet
    backend.normalizer = None  # lossless: text is never changed
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),  # "2024" -> 2 0 2 4: arithmetic tokenizes evenly
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),  # GPT-2 regex, then bytes -> chars
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=sp.all(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(documents, trainer=trainer)
    if add_bos and sp.bos is not None:
        bos = [(sp.bos, backend.token_to_id(sp.bos))]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{sp.bos} $A", pair=f"{sp.bos} $A {sp.bos} $B", special_tokens=bos
        )
    return Tokenizer(backend, bos_token=sp.bos, eos_token=sp.eos, pad_token=sp.pad, add_bos=add_bos,
                     chat_template=chatml_template(sp.im_start, sp.eos))
