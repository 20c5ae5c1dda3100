"""A training run's folder: `config.yaml`, and `checkpoints/step-N/` (a model folder + `train_state.pt`: optimizer,
scheduler, RNG states, step), each written to a temporary name and renamed when complete. The check that keeps a
new run from writing over another is `open_run`. (`metrics.jsonl` and TensorBoard events: lmforge.train.metrics.)"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from lmforge.checkpoint.atomic import atomic_folder, write_text_atomic

TRAIN_STATE = "train_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def open_run(run_dir: str | os.PathLike, resume: bool, config: Any = None) -> Path:
    """Makes `run_dir` ready for a run and writes `config` (a dataclass) there as config.yaml. A folder with
    checkpoints holds a run: without `resume`, training there would overwrite its model and mix its metrics, and
    pruning would delete the new run's own checkpoints. Refused, naming the way out, before anything is written."""
    run_dir = Path(run_dir)
    done = [p.name for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir()]
    if done and not resume:
        last = max(done, key=lambda n: int(n.split("-")[1]) if n.split("-")[1].isdigit() else -1)
        raise ValueError(f"{run_dir}: already holds a run (checkpoints up to {last}): pass --resume "
                         "(train.resume: true) to continue it, or choose a new out_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    if config is not None:
        write_text_atomic(run_dir / "config.yaml",
                          yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True))
    return run_dir


def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of an interrupted write don't count)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / TRAIN_STATE).exists()]
    return sorted(done, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def resume_checkpoint(run_dir: str | os.PathLike, load_model: Callable[[Path], None], main: bool = True
                      ) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads — its train state read and its weights loaded by `load_model` — or None
    when the run has none. A newer one that fails (a disk that filled up, a file damaged after it was written)
    is named and kept, renamed to `step-N.broken` by the main process so that neither pruning nor the resumed
    run writes over it, and the one before it is used. None of them loading is an error: a run that resumes
    must not start over. `weights_only`: tensors and plain data only, and the file is our own."""
    broken = []
    for folder in reversed(checkpoints(run_dir)):
        try:
            state = torch.load(folder / TRAIN_STATE, weights_only=True, map_location="cpu")
            load_model(folder)
        except Exception as e:  # whatever is wrong with it, the previous checkpoint may be whole
            broken.append(f"{folder.name} ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})")
            if main:
                aside = folder.with_name(f"{folder.name}.broken")
                n = 1
                while aside.exists():
                    n += 1
                    aside = folder.with_name(f"{folder.name}.broken-{n}")
                os.replace(folder, aside)
            continue
        if broken and main:
            print(f"lmforge: checkpoint(s) that do not load, kept as <name>.broken: {'; '.join(broken)}; resuming "
                  f"from {folder.name}", file=sys.stderr, flush=True)
        return folder, state
    if broken:
        raise ValueError(f"{run_dir}: no checkpoint loads ({'; '.join(broken)}); they are kept as <name>.broken")
    return None


def write_checkpoint(folder: Path, save_model: Callable[[Path], None], state: dict[str, Any]) -> None:
    """Checkpoint `folder`, atomically: the model folder written by `save_model`, then the train state."""
    with atomic_folder(folder) as tmp:
        save_model(tmp)
        torch.save(state, tmp / TRAIN_STATE)


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Deletes all but the `keep` newest checkpoints, and the temporary folders a killed writer left."""
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in (run_dir / "checkpoints").glob(".step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """Every RNG's state (Python, NumPy, torch, CUDA) as tensors and plain data (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2], "numpy": torch.from_numpy(keys.astype(np.int64)),
             "numpy_rest": [pos, has_gauss, gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(s: dict[str, Any]) -> None:
    """Puts back what `rng_state` saved."""
    random.setstate((s["python_version"], tuple(s["python"]), s["python_gauss"]))
    pos, has_gauss, gauss = s["numpy_rest"]
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
