"""`load_qa`: any QA source by its form (a file, a hub id, a prepared TFDS dataset).

Above both `qa` (files, the hub) and `tfds_builder` (which reads files through `qa`), so neither
imports the other's dispatcher.
"""

from __future__ import annotations

from pathlib import Path

from zerosearch_jax.data.qa import OnError, QAExample, load_file, load_hf_dataset
from zerosearch_jax.data.tfds_builder import load_tfds


def load_qa(
    source: str | Path,
    split: str | None = None,
    limit: int | None = None,
    on_error: OnError = "raise",
) -> list[QAExample]:
    """Load QA examples from a file or a dataset id, choosing the loader by its form.

    Args:
      source: one of
        - `path/to/file.jsonl` (FlashRAG format) or `path/to/file.parquet` (upstream format);
        - `hf:NAME` or `hf:NAME:CONFIG`, e.g. `hf:RUC-NLPIR/FlashRAG_datasets:nq`;
        - `tfds:NAME_OR_DIR`, a prepared TFDS dataset (see `tfds_builder`; needs tensorflow).
      split: the split of an `hf:` / `tfds:` source (hf default: test, else dev); files hold one
        split, so it must be None for them.
      limit: keep at most this many examples (the first ones).
      on_error: "raise" or "skip" malformed rows.
    """
    text = str(source)
    if text.startswith("hf:"):
        name, _, config = text[len("hf:") :].partition(":")
        return load_hf_dataset(name, config or None, split, limit=limit, on_error=on_error)
    if text.startswith("tfds:"):
        return load_tfds(text[len("tfds:") :], split or "test", limit=limit)
    if split is not None:
        raise ValueError(
            f"split={split!r} applies to 'hf:'/'tfds:' sources only; the file {text!r} holds one "
            "split"
        )
    return load_file(text, limit=limit, on_error=on_error)
