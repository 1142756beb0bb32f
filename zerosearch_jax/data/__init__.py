"""QA data: examples and their loaders, a synthetic knowledge world, an optional TFDS builder.

`tfds_builder` is not imported here: it is only for users with tensorflow-datasets installed.
"""

from zerosearch_jax.data.qa import (
    DataError,
    QAExample,
    examples_from_dataset,
    load_hf_dataset,
    load_jsonl,
    load_parquet,
    load_qa,
    record_to_example,
    sample,
)
from zerosearch_jax.data.synthetic import SPLITS, World, WorldConfig, build_world

__all__ = [
    "SPLITS",
    "DataError",
    "QAExample",
    "World",
    "WorldConfig",
    "build_world",
    "examples_from_dataset",
    "load_hf_dataset",
    "load_jsonl",
    "load_parquet",
    "load_qa",
    "record_to_example",
    "sample",
]
