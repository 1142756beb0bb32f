"""JSON-lines files: located reading (errors name `file:line`) and crash-safe append-only logs.

Long host jobs (simulator-data collection, evaluation) write one record a line as they go, so a
killed job loses at most the line it was writing. `AppendOnlyJSONL` reopens such a file, drops a
torn last line (logged; the file is truncated to the last complete record, so nothing that was
complete is ever lost) and appends with flush + fsync per batch.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]


class JSONLError(ValueError):
    """A malformed line, named by `file:line`."""


def iter_jsonl(path: str | Path) -> Iterator[tuple[str, Mapping[str, Any] | str]]:
    """(`file:line`, record) for every non-blank line; the record is an error message (a `str`)
    where the line is not a JSON object. Line numbers are 1-based."""
    path = Path(path)
    with path.open("rb") as f:  # bytes: a line that is not UTF-8 is that line's error alone
        for line_number, raw in enumerate(f, start=1):
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, f"not UTF-8 (byte {err.start}: {raw[err.start:err.start + 1]!r})"
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield where, f"invalid JSON ({err})"
                continue
            except RecursionError:
                yield where, "JSON nested too deeply"
                continue
            yield where, record if isinstance(record, dict) else f"not a JSON object: {line!r}"


def handle_bad_row(where: str, error: str, on_error: OnError) -> None:
    """Raises `JSONLError` naming the location, or logs and returns (the caller skips)."""
    if on_error == "raise":
        raise JSONLError(f"{where}: {error}")
    if on_error != "skip":
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    logger.warning("skipping malformed line %s: %s", where, error)


def read_jsonl(path: str | Path, on_error: OnError = "raise") -> list[dict]:
    """Every JSON-object line of `path`; malformed lines raise or are skipped (logged)."""
    out = []
    for where, record in iter_jsonl(path):
        if isinstance(record, str):
            handle_bad_row(where, record, on_error)
        else:
            out.append(dict(record))
    return out


def write_jsonl_atomic(path: str | Path, records: Iterable[Mapping]) -> None:
    """Writes all records to a temporary file and renames it over `path`: readers see the old
    file or the new one, never half of it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class AppendOnlyJSONL:
    """An append-only JSONL log that survives being killed mid-write.

    `records` holds what the file had when opened (complete lines only). A torn final line
    (no newline, or not valid JSON) is cut off with a warning; a malformed line elsewhere means
    the file was edited by hand, and raises naming its line rather than guessing.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        good_end = 0
        lines = data.split(b"\n")
        for number, raw in enumerate(lines, start=1):
            last = number == len(lines)
            if not raw.strip():
                good_end += len(raw) + (0 if last else 1)
                continue
            try:
                record = json.loads(raw)
                if not isinstance(record, dict) or last:  # a complete line ends with "\n"
                    raise ValueError("incomplete")
            except ValueError:
                if number >= len(lines) - 1 and not any(x.strip() for x in lines[number:]):
                    logger.warning("%s:%d: dropping a torn last line (%d bytes) left by an "
                                   "interrupted write", self.path, number, len(raw))
                    break
                raise JSONLError(f"{self.path}:{number}: not a JSON object; the log is "
                                 "corrupted before its last line") from None
            self.records.append(record)
            good_end += len(raw) + 1
        if good_end < len(data):
            with self.path.open("r+b") as f:
                f.truncate(good_end)

    def append(self, records: Iterable[Mapping]) -> None:
        """Appends records, then flushes and fsyncs (one batch = one durable write)."""
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if not text:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        self.records.extend(json.loads(line) for line in text.splitlines())
