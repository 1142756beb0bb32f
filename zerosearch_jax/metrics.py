"""Training metrics on disk: an append-only JSONL file per run, mirrored to TensorBoard.

`<workdir>/metrics.jsonl` is the record of a run: one JSON object per `MetricsWriter.write`
call, `{"step": 12, "time": 1718000000.0, "reward/f1": 0.41, ...}`. Each line is flushed and
fsynced as it is written, so a run killed mid-training (preemption, OOM) loses nothing already
logged; at worst the last line is cut short, and `read_metrics` skips it with a warning.
`zerosearch_jax.plot` draws the training curves from this file, so plots need no TensorBoard.
The same scalars go to `<workdir>/tensorboard/` for live viewing.

Several rows may share a step (training metrics and `val/` metrics are separate writes).
Non-finite values (a NaN loss on a skipped step) are written as `null` rather than crashing the
run or producing invalid JSON.

Resuming: a run killed at step s + k and restarted from the checkpoint at step s would log steps
s+1 .. s+k twice. `MetricsWriter.truncate_after(s)` drops the killed attempt's rows from the JSONL
(atomic rewrite) and tells TensorBoard to hide its events (`purge_step`).

Multi-host: only process 0 should log; other processes pass `enabled=False`, which makes every
method a no-op and touches no file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_RESERVED_KEYS = ("step", "time")
# Suffixes of a score's interval bounds (`f1_lo`, `f1_hi`): printed beside it, drawn as its band.
INTERVAL_BOUNDS = ("_lo", "_hi")


def metrics_path(workdir_or_file: str | os.PathLike) -> Path:
    """`<workdir>/metrics.jsonl` for a run directory; a file (or any `*.jsonl`) is unchanged."""
    path = Path(workdir_or_file)
    return path if path.is_file() or path.suffix == ".jsonl" else path / METRICS_FILE


def _to_json_number(key: str, value: Any) -> float | None:
    """A Python float for a Python / numpy / JAX scalar; None (JSON null) if it is not finite."""
    try:
        number = float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"metric {key!r} must be a real scalar (float, int, numpy or JAX 0-d array), "
            f"got {type(value).__name__}: {value!r}"
        ) from e
    return number if math.isfinite(number) else None


def _fsync_dir(path: Path) -> None:
    """Makes a rename inside `path` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MetricsWriter:
    """Appends scalar metrics of one run to `<workdir>/metrics.jsonl` and TensorBoard.

    Usage:
        with MetricsWriter(workdir, enabled=jax.process_index() == 0) as writer:
            if resumed_step is not None:
                writer.truncate_after(resumed_step)
            writer.write(step, {"reward/f1": f1, "train/kl_loss": kl})
            writer.write(step, {"f1": val_f1}, prefix="val")
    """

    def __init__(
        self, workdir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True
    ):
        self.enabled = enabled
        self.workdir = Path(workdir)
        self.path = self.workdir / METRICS_FILE
        self._use_tensorboard = tensorboard
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._file = self._open_for_append()
        if tensorboard:
            self._tb = self._open_tensorboard(purge_step=None)

    def _open_for_append(self):
        file = open(self.path, "a+b")
        # A run killed mid-write can leave a partial last line; terminate it so the next row
        # starts on its own line (read_metrics then skips just the partial one).
        if file.seek(0, os.SEEK_END) > 0:
            file.seek(-1, os.SEEK_END)
            if file.read(1) != b"\n":
                file.write(b"\n")
                file.flush()
                os.fsync(file.fileno())
        return file

    def _open_tensorboard(self, purge_step: int | None):
        # Imported here so that runs with tensorboard=False never pay for (or need) the import.
        from tensorboardX import SummaryWriter

        # Event file names carry only whole seconds; the suffix keeps a writer reopened by
        # truncate_after within the same second from overwriting the previous file.
        return SummaryWriter(
            str(self.workdir / TENSORBOARD_DIR),
            purge_step=purge_step,
            filename_suffix=f".{time.time_ns()}",
        )

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
        """Logs `metrics` at `step`; keys become `<prefix>/<key>` when `prefix` is given.

        `prefix` may be given with or without its trailing slash ("val" and "val/" both give
        "val/f1"). Values are scalars (Python, numpy or JAX); NaN / inf are written as null and
        left out of TensorBoard.
        """
        if not self.enabled:
            return
        if self._file is None:
            raise ValueError(f"MetricsWriter for {self.path} is closed")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        values: dict[str, float | None] = {}
        for key, value in metrics.items():
            name = f"{prefix}{key}"
            if name in _RESERVED_KEYS:
                raise ValueError(f"metric name {name!r} is reserved; use another key")
            values[name] = _to_json_number(name, value)
        step = int(step)
        row = {"step": step, "time": time.time(), **values}
        line = json.dumps(row, allow_nan=False) + "\n"
        self._file.write(line.encode())
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            for name, value in values.items():
                if value is not None:
                    self._tb.add_scalar(name, value, global_step=step)
            self._tb.flush()

    def truncate_after(self, step: int) -> None:
        """Drops every logged row with step > `step`; called when resuming from checkpoint `step`.

        The JSONL is rewritten to a temporary file and swapped in with `os.replace`, so a crash
        during the rewrite leaves either the old or the new file, never a partial one. Malformed
        lines are dropped too. TensorBoard event files are append-only, so instead a new event
        file is started with `purge_step = step + 1`, which makes TensorBoard hide the killed
        attempt's events from that step on.
        """
        if not self.enabled:
            return
        if self._file is None:
            raise ValueError(f"MetricsWriter for {self.path} is closed")
        step = int(step)
        kept = [row for row in read_metrics(self.path) if row["step"] <= step]
        self._file.close()
        fd, tmp = tempfile.mkstemp(prefix=f".{METRICS_FILE}.", dir=self.workdir)
        try:
            with os.fdopen(fd, "wb") as out:
                for row in kept:
                    out.write((json.dumps(row) + "\n").encode())
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            self._file = self._open_for_append()
        _fsync_dir(self.workdir)
        if self._tb is not None:
            self._tb.close()
            self._tb = self._open_tensorboard(purge_step=step + 1)

    def close(self) -> None:
        """Closes the JSONL file and the TensorBoard writer; further writes raise."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_metrics(workdir_or_file: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl, in file order; null values come back as None.

    A line that is not a JSON object with an integer "step" (typically the last line of a killed
    run, cut short mid-write) is skipped with a warning naming `file:line`.
    """
    path = metrics_path(workdir_or_file)
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                logger.warning("%s:%d: skipping malformed metrics line (%s)", path, lineno, e)
                continue
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                logger.warning(
                    "%s:%d: skipping metrics line without an integer 'step': %.80s",
                    path, lineno, line.rstrip(),
                )
                continue
            rows.append(row)
    return rows


def bootstrap_interval(values, level: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `values` (per-question scores):
    resample the questions with replacement `resamples` times. (nan, nan) for no values."""
    x = np.asarray(values, np.float64)
    if x.size == 0:
        return math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))
    means = x[idx].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired_gain(before, after, level: float = 0.95, resamples: int = 2000,
                seed: int = 0) -> tuple[float, float, float]:
    """(mean of after - before, its percentile bootstrap interval) for per-question scores of
    the same questions, in the same order: the questions are resampled together, so the
    interval measures the change itself, free of how hard the questions are (two separate
    intervals around the two means overlap far more). (nan, nan, nan) for no questions."""
    a, b = np.asarray(after, np.float64), np.asarray(before, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need one shape, got {b.shape} and {a.shape}")
    d = a - b
    lo, hi = bootstrap_interval(d, level, resamples, seed)
    return (float(d.mean()) if d.size else math.nan), lo, hi


def groups_with_spread(rewards, group) -> float:
    """The share of groups (a question's samples) whose rewards are not all equal: the part of
    a step GRPO learns from, since a group of equal rewards has zero advantage on every token.
    rewards, group: [B] episode rewards and group ids; 0.0 for an empty batch."""
    r, g = np.asarray(rewards, np.float64), np.asarray(group)
    if r.size == 0:
        return 0.0
    ids, inverse = np.unique(g, return_inverse=True)
    low = np.full(ids.size, np.inf)
    high = np.full(ids.size, -np.inf)
    np.minimum.at(low, inverse, r)
    np.maximum.at(high, inverse, r)
    return float(np.mean(high > low))


def summary(metrics: Mapping[str, float]) -> str:
    """The top-level scores of a metrics dict on one line (`f1=0.500 [0.38, 0.62], em=0.438`),
    a score's 95% interval beside it when the dict holds one (`f1_lo`, `f1_hi`); per-source
    keys (`nq/f1`) are left out."""
    parts = []
    for k, v in metrics.items():
        if "/" in k or k.endswith(INTERVAL_BOUNDS):
            continue
        lo, hi = (metrics.get(k + b) for b in INTERVAL_BOUNDS)
        parts.append(f"{k}={v:.3f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None else ""))
    return ", ".join(parts)
