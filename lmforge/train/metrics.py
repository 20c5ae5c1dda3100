"""A run's metrics: `metrics.jsonl` in the run folder, one JSON record a line (`{"step": 3, "loss": 2.1, ...}`),
and the same scalars as TensorBoard events where tensorboard is installed. `fit` writes them (`MetricsWriter`),
`lmforge plot` reads them (`read_metrics`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmforge.checkpoint.atomic import write_text_atomic

FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends records to run_dir/metrics.jsonl and to TensorBoard (run_dir/tensorboard). With `run_dir` None it
    writes nothing (the processes other than rank 0). `resumed_at`: the step a resumed run goes on from; the
    records after it are dropped first, since those steps run, and log, again."""

    def __init__(self, run_dir: Path | None, resumed_at: int | None = None) -> None:
        self.file = self.tensorboard = None
        if run_dir is None:
            return
        if resumed_at is not None:
            _drop_after(run_dir / FILE, resumed_at)
        self.file = open(run_dir / FILE, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional at run time
            self.tensorboard = None

    def log(self, record: dict[str, Any]) -> None:
        """One record (it has a "step"); flushed, so a killed run keeps what it logged."""
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tensorboard.add_scalar(k, v, record["step"])

    def log_eval(self, step: int, result: dict[str, float]) -> None:
        """An evaluation's results, logged as eval/<name> and said in one line."""
        self.log({"step": step, **{f"eval/{k}": v for k, v in result.items()}})
        if self.file is not None:
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.file is not None:
            self.file.close()


def _drop_after(path: Path, step: int) -> None:
    """Keeps the records of steps <= `step` (atomically): the steps a stopped run logged after its last checkpoint
    are redone on resume and would otherwise appear twice."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a partial last line of a killed run
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or record["step"] <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        write_text_atomic(path, "".join(keep))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of run_dir/metrics.jsonl. Blank lines are skipped, and so is a partial last line (a run killed
    while writing); any other bad line is an error naming file and line."""
    path = Path(run_dir) / FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no {FILE} in this run folder")
    records = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # a run killed while writing leaves a partial last line: read what is whole
                break
            raise ValueError(f"{path}:{n}: not valid JSON") from None
        if not isinstance(r, dict) or not isinstance(r.get("step"), int):
            raise ValueError(f"{path}:{n}: a record needs an integer 'step'")
        records.append(r)
    return records


class Throughput:
    """Tokens counted since the last reading, and the rate at which they went."""

    def __init__(self) -> None:
        self.since, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def per_second(self) -> float:
        """Tokens per second since the last call (or the start); the count starts again."""
        now = time.perf_counter()
        rate = self.tokens / max(now - self.since, 1e-9)
        self.since, self.tokens = now, 0
        return rate
