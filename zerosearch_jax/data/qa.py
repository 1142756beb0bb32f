"""Question-answer examples and their loaders (FlashRAG jsonl, upstream parquet, Hugging Face hub).

Every source becomes a list of `QAExample(id, question, golden_answers, data_source)`, the only
thing the rollout and evaluation code read from the data:

- jsonl, the FlashRAG convention: one `{"id", "question", "golden_answers", "data_source"}` object a
  line; `golden_answers` may also be one string, or be named `answer` / `answers`. An optional
  `bridge_answers` list (a multi-hop question's first-hop answers, as the synthetic world writes
  them) is kept too.
- parquet, the upstream ZeroSearch / Search-R1 training files *unchanged* (columns `id, question,
  golden_answers, data_source, prompt, ability, reward_model, extra_info`); when `golden_answers`
  is absent the gold comes from `reward_model.ground_truth.target`. The stored `prompt` column is
  ignored: the prompt is rebuilt from the question by the rollout code.
- the Hugging Face hub through `datasets.load_dataset` (e.g. `RUC-NLPIR/FlashRAG_datasets`, `nq`).

`data.load_qa(source)` (`data/sources.py`) picks the loader from the extension or a `hf:` /
`tfds:` prefix. A malformed row (invalid JSON, missing or empty question or gold answers) is
reported with its location
(`file:line` for jsonl, `file:row N` for parquet, both 1-based): `on_error="raise"` raises
`DataError`, `on_error="skip"` logs a warning and drops the row.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from zerosearch_jax.data.jsonl import iter_jsonl

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
# Keys that may hold the gold answers, in order of preference (FlashRAG, then common variants).
_ANSWER_KEYS = ("golden_answers", "answers", "answer")
# Splits tried, in order, when `load_hf_dataset` is given none (FlashRAG has no test set for some).
_DEFAULT_HF_SPLITS = ("test", "dev", "validation")


class DataError(ValueError):
    """QA data cannot be used: a malformed row (message starts with its location) or a source
    that cannot be loaded."""


@dataclasses.dataclass(frozen=True)
class QAExample:
    """One question with its gold answers.

    Attributes:
      id: identifier, unique within its source (e.g. "test_0").
      question: the question text, stripped.
      golden_answers: one or more accepted answers (aliases); metrics take the max over them.
      data_source: dataset name (e.g. "nq"), used to group metrics.
      bridge_answers: a multi-hop question's first-hop answers (the bridge entity's names),
        where the data knows them (the synthetic world); empty otherwise. Read only by a
        simulator with `hop_answers` (`search.simulator`).
    """

    id: str
    question: str
    golden_answers: tuple[str, ...]
    data_source: str
    bridge_answers: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Row conversion, shared by every loader
# ---------------------------------------------------------------------------------------------


def _gold_answers(record: Mapping[str, Any]) -> tuple[str, ...]:
    for key in _ANSWER_KEYS:
        if record.get(key) is not None:
            value = record[key]
            break
    else:
        # Upstream parquet: reward_model = {"ground_truth": {"target": [...]}, "style": "rule"}.
        value = record.get("reward_model")
        for key in ("ground_truth", "target"):
            value = value.get(key) if isinstance(value, Mapping) else None
    if value is None:
        return ()
    # A single answer may be a bare string or number (years); None/empty entries are dropped.
    if isinstance(value, (str, int, float)) or not isinstance(value, Iterable):
        value = [value]
    if isinstance(value, Mapping):
        raise ValueError(f"gold answers must be a string or a list of strings, got a mapping "
                         f"{_short(value)}")
    return tuple(s for s in (_answer_text(v) for v in value if v is not None) if s)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _answer_text(value: Any) -> str:
    """One gold answer as text: a string, or a finite number (years, counts); anything else
    (booleans, NaN, containers) is an error, not its `str()`."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
            value, (bool, np.bool_)) and np.isfinite(value):
        return str(value.item() if isinstance(value, np.generic) else value)
    raise ValueError(f"a gold answer must be a string or a finite number, got {_short(value)}")


def record_to_example(
    record: Mapping[str, Any], *, default_id: str, default_source: str
) -> QAExample:
    """Convert one row (a dict) to a `QAExample`.

    Args:
      record: mapping with `question` and gold answers (see the module docstring for the keys).
      default_id: used when the row has no `id`.
      default_source: used when the row has no `data_source`.

    Raises:
      ValueError: the question or the gold answers are missing or empty (message names which).
    """
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"missing or empty 'question' (got {question!r})")
    golden_answers = _gold_answers(record)
    if not golden_answers:
        raise ValueError(
            f"missing or empty gold answers (looked for {list(_ANSWER_KEYS)} and "
            f"reward_model.ground_truth.target) for question {question!r}"
        )
    example_id = record.get("id")
    data_source = record.get("data_source")
    bridge = record.get("bridge_answers")
    if bridge is None:
        bridge = ()
    elif isinstance(bridge, str) or not all(isinstance(b, str) and b.strip() for b in bridge):
        raise ValueError(f"'bridge_answers' must be a list of non-empty strings, got "
                         f"{_short(bridge)}")
    return QAExample(
        id=default_id if example_id is None else str(example_id),
        question=question.strip(),
        golden_answers=golden_answers,
        data_source=data_source if isinstance(data_source, str) and data_source else default_source,
        bridge_answers=tuple(b.strip() for b in bridge),
    )


def _collect(
    rows: Iterable[tuple[str, Mapping[str, Any] | str]],
    *,
    default_id_prefix: str,
    default_source: str,
    limit: int | None,
    on_error: OnError,
) -> list[QAExample]:
    """Convert located rows to examples, handling errors the same way for every loader.

    Args:
      rows: (location, record) pairs; a `str` record is an error message for that location.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit!r}")
    examples: list[QAExample] = []
    for index, (where, record) in enumerate(rows):
        if limit is not None and len(examples) >= limit:
            break
        try:
            if isinstance(record, str):
                raise ValueError(record)
            examples.append(
                record_to_example(
                    record,
                    default_id=f"{default_id_prefix}_{index}",
                    default_source=default_source,
                )
            )
        except ValueError as err:
            if on_error == "raise":
                raise DataError(f"{where}: {err}") from None
            logger.warning("skipping malformed QA row at %s: %s", where, err)
    return examples


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------


def load_jsonl(
    path: str | Path,
    *,
    data_source: str | None = None,
    limit: int | None = None,
    on_error: OnError = "raise",
) -> list[QAExample]:
    """Read a FlashRAG-style jsonl file (blank lines ignored).

    Args:
      path: the .jsonl file.
      data_source: used for rows without `data_source` (default: the file stem).
      limit: keep at most this many examples (the first ones).
      on_error: "raise" a `DataError` at the first malformed line, or "skip" it with a warning.
    """
    path = Path(path)
    return _collect(
        iter_jsonl(path),
        default_id_prefix=path.stem,
        default_source=data_source or path.stem,
        limit=limit,
        on_error=on_error,
    )


def _parquet_rows(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet_file = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    wanted = ("id", "question", "data_source", "reward_model", *_ANSWER_KEYS)
    columns = [name for name in parquet_file.schema_arrow.names if name in wanted]
    row_number = 0
    for batch in parquet_file.iter_batches(batch_size=1024, columns=columns):
        for record in batch.to_pylist():
            row_number += 1
            yield f"{path}:row {row_number}", record


def load_parquet(
    path: str | Path,
    *,
    data_source: str | None = None,
    limit: int | None = None,
    on_error: OnError = "raise",
) -> list[QAExample]:
    """Read an upstream ZeroSearch / Search-R1 parquet file, or any parquet with the jsonl columns.

    Only the columns needed are read (`prompt`, `ability` and `extra_info` are ignored). Arguments
    as for `load_jsonl`; row numbers in messages are 1-based.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parquet file not found: {path}")
    return _collect(
        _parquet_rows(path),
        default_id_prefix=path.stem,
        default_source=data_source or path.stem,
        limit=limit,
        on_error=on_error,
    )


def examples_from_dataset(
    dataset: Iterable[Mapping[str, Any]],
    *,
    name: str,
    data_source: str | None = None,
    limit: int | None = None,
    on_error: OnError = "raise",
) -> list[QAExample]:
    """Convert the rows of a loaded `datasets.Dataset` (or any iterable of dicts).

    Args:
      name: how the source is named in messages and default ids, e.g. "nq[test]".
      data_source: used for rows without `data_source` (default: `name`).
    """
    rows = ((f"{name}:row {i}", record) for i, record in enumerate(dataset, start=1))
    return _collect(
        rows,
        default_id_prefix=name,
        default_source=data_source or name,
        limit=limit,
        on_error=on_error,
    )


def load_hf_dataset(
    name: str,
    config: str | None = None,
    split: str | None = None,
    *,
    data_source: str | None = None,
    limit: int | None = None,
    on_error: OnError = "raise",
) -> list[QAExample]:
    """Load QA examples from the Hugging Face hub (or its local cache) with `datasets`.

    Args:
      name: dataset id, e.g. "RUC-NLPIR/FlashRAG_datasets".
      config: dataset config, e.g. "nq".
      split: split name; None takes the first of "test", "dev", "validation" that exists.
      data_source: used for rows without `data_source` (default: `config` or `name`).

    Raises:
      DataError: the hub is unreachable / the dataset, config or split does not exist (the
        message names them), or a row is malformed with on_error="raise".
    """
    import datasets

    what = f"Hugging Face dataset {name!r} (config {config!r}, split {split!r})"
    try:
        if split is None:
            available = datasets.get_dataset_split_names(name, config)
            split = next((s for s in _DEFAULT_HF_SPLITS if s in available), None)
            if split is None:
                raise DataError(
                    f"{what}: none of the default splits {list(_DEFAULT_HF_SPLITS)} exists; "
                    f"pass split= one of {available}"
                )
            what = f"Hugging Face dataset {name!r} (config {config!r}, split {split!r})"
        dataset = datasets.load_dataset(name, config, split=split)
    except DataError:
        raise
    except Exception as err:  # hub/cache errors have many types; re-raised naming the dataset.
        raise DataError(
            f"could not load {what}: {type(err).__name__}: {err}. Without network access, use a "
            "local jsonl/parquet copy or a populated HF cache with HF_DATASETS_OFFLINE=1."
        ) from err
    return examples_from_dataset(
        dataset,
        name=f"{name}/{config}[{split}]" if config else f"{name}[{split}]",
        data_source=data_source or config or name,
        limit=limit,
        on_error=on_error,
    )


def load_file(path: str | Path, limit: int | None = None,
              on_error: OnError = "raise") -> list[QAExample]:
    """A `.jsonl` (FlashRAG) or `.parquet` (upstream) file, the loader chosen by its suffix."""
    text = str(path)
    suffix = Path(text).suffix.lower()
    if suffix == ".jsonl":
        return load_jsonl(text, limit=limit, on_error=on_error)
    if suffix == ".parquet":
        return load_parquet(text, limit=limit, on_error=on_error)
    raise ValueError(
        f"cannot tell the format of QA source {text!r}: expected a .jsonl or .parquet file, "
        "or an 'hf:NAME[:CONFIG]' / 'tfds:NAME_OR_DIR' id"
    )


def indices_by_source(examples: Sequence[QAExample]) -> dict[str, list[int]]:
    """The examples' positions, grouped by data source (each group in the examples' order)."""
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(e.data_source, []).append(i)
    return groups


def sample(examples: Sequence[QAExample], n: int | None, seed: int,
           stratify: bool = False) -> list[QAExample]:
    """A fixed-seed subset of `n` examples, in their original order; all when n is None or >= len.

    Used to draw the 500-question evaluation subsets (docs/method.md §9) reproducibly. With
    `stratify`, the `n` are shared evenly among the examples' data sources (a remainder goes to
    the first sources in sorted order; a source with too few examples gives all it has and the
    rest go to the others), so e.g. single- and two-hop questions are equally represented.
    """
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n!r}")
    if n is None or n >= len(examples):
        return list(examples)
    rng = np.random.default_rng(seed)
    if not stratify:
        return [examples[i] for i in sorted(rng.choice(len(examples), size=n, replace=False))]
    groups = indices_by_source(examples)
    quota = dict.fromkeys(groups, 0)
    left = n
    while left:  # one more per source that still has some, in sorted order, until n
        for src in sorted(groups):
            if left and quota[src] < len(groups[src]):
                quota[src] += 1
                left -= 1
    chosen = [i for src in sorted(groups)
              for i in rng.choice(groups[src], size=quota[src], replace=False)]
    return [examples[i] for i in sorted(chosen)]
