"""QA data: examples and their loaders, a synthetic knowledge world, an optional TFDS builder
(tensorflow-datasets is imported only when a TFDS dataset is built or read)."""

from zerosearch_jax.data.qa import (
    DataError,
    QAExample,
    examples_from_dataset,
    load_file,
    load_hf_dataset,
    load_jsonl,
    load_parquet,
    record_to_example,
    sample,
)
from zerosearch_jax.data.sources import load_qa
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
    "load_file",
    "load_jsonl",
    "load_parquet",
    "load_qa",
    "record_to_example",
    "sample",
]
