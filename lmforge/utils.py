"""Devices and dtypes: the one place that turns a user's string into a torch object."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from tqdm import tqdm

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None / 'auto' -> cuda:0 when available, else cpu; otherwise checked against what exists."""
    if device is None or device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device {device!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available here; use 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "meta":
        raise ValueError("device 'meta' holds no data; use cpu, cuda or mps")
    elif device.type != "cpu":
        backend = getattr(torch.backends, device.type, None) or getattr(torch, device.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise ValueError(f"device {str(device)!r} is not available here; use 'cpu'")
    return device


class _Lines:
    """A file for tqdm where stderr is no terminal (a log file, a pipe, CI): each refresh becomes one plain line,
    instead of a bar redrawn with carriage returns."""

    def write(self, s: str) -> None:
        s = s.replace("\r", "").strip()
        if s:
            sys.stderr.write(s + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


def progress_bar(iterable: Any = None, *, interval: float = 10.0, **kwargs: Any) -> tqdm:
    """A tqdm progress bar on a terminal; where stderr is a file or a pipe, a plain line every `interval` seconds
    (and one at the end)."""
    if sys.stderr.isatty():
        return tqdm(iterable, dynamic_ncols=True, **kwargs)
    return tqdm(iterable, file=_Lines(), mininterval=interval, ncols=100, ascii=True, **kwargs)


class PlacementError(RuntimeError):
    """The inputs and the parameters are on different devices or in different dtypes (the user's mix-up)."""


@contextmanager
def placement_errors(model: torch.nn.Module | None = None) -> Iterator[None]:
    """Turns torch's device/dtype mismatch errors raised inside the block into a `PlacementError` that says
    where the model's parameters are, when given (the command line prints it as one line)."""
    try:
        yield
    except RuntimeError as e:
        msg = str(e)
        if not any(s in msg.lower() for s in ("same device", "same dtype", "expected scalar type")):
            raise
        seen: dict[str, int] = {}
        for p in model.parameters() if model is not None else ():
            key = f"{p.device}/{str(p.dtype).removeprefix('torch.')}"
            seen[key] = seen.get(key, 0) + 1
        where = f"parameters on {', '.join(f'{k} ({n})' for k, n in seen.items())}. " if seen else ""
        raise PlacementError(f"device/dtype mix-up: {where}Move the whole model with model.to(...). "
                             f"({msg.splitlines()[0]})") from e


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 autocast on CUDA when asked for; a no-op context otherwise."""
    enabled = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=enabled)


class Terminated(KeyboardInterrupt):
    """SIGTERM where `sigterm_interrupts` is in force: the work stops at once, as Ctrl-C stops it (a
    KeyboardInterrupt, so no `except Exception` on the way takes it for a failure of its own)."""


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block SIGTERM raises `Terminated` where the main thread is, instead of killing the process
    outright: files being written are cleaned up by their `atomic_*` blocks, and the command line can say how to
    continue. (`fit` handles both signals itself while it trains: a step finishes and is checkpointed first.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: Any) -> None:
        raise Terminated

    before = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
