"""TensorFlow Datasets (TFDS) builder for QA examples, for TPU jobs that keep data on GCS.

Prepare once from jsonl / parquet files (read with `qa.load_file`, so the same formats and
validation apply), then read the prepared dataset anywhere, e.g. from `gs://`:

    Builder = make_builder_class({"train": "nq_train.parquet", "test": "nq_test.jsonl"})
    Builder(data_dir="gs://bucket/tfds").download_and_prepare()
    examples = load_tfds("gs://bucket/tfds/zerosearch_qa/1.0.0", "test")

tensorflow and tensorflow-datasets are optional (`pip install tensorflow-datasets tensorflow`):
they are imported only inside the functions that need them. The feature conversion
(`examples_to_tfds_features`, `tfds_features_to_example`) is plain Python.

Features: `id`, `question`, `data_source` (Text) and `golden_answers` (Sequence of Text). Example
order is kept as in the source files (shuffling disabled), so evaluation subsets are stable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zerosearch_jax.data.qa import QAExample, load_file

_INSTALL_HINT = "pip install tensorflow-datasets tensorflow"


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(
            f"the TFDS QA builder needs tensorflow-datasets and tensorflow: {_INSTALL_HINT}"
        ) from err
    return tfds


def examples_to_tfds_features(example: QAExample) -> dict[str, Any]:
    """The TFDS feature dict of one example: str fields, `golden_answers` as a list of str."""
    return {
        "id": example.id,
        "question": example.question,
        "golden_answers": list(example.golden_answers),
        "data_source": example.data_source,
    }


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def tfds_features_to_example(features: Mapping[str, Any]) -> QAExample:
    """Inverse of `examples_to_tfds_features`; accepts the bytes that `tfds.as_numpy` yields."""
    return QAExample(
        id=_text(features["id"]),
        question=_text(features["question"]),
        golden_answers=tuple(_text(a) for a in features["golden_answers"]),
        data_source=_text(features["data_source"]),
    )


def make_builder_class(
    split_files: Mapping[str, str | Path],
    *,
    name: str = "zerosearch_qa",
    version: str = "1.0.0",
) -> type:
    """A `tfds.core.GeneratorBasedBuilder` subclass that prepares `split_files`.

    Args:
      split_files: split name -> QA file `qa.load_file` reads (.jsonl / .parquet).
      name: dataset name; prepared data goes to `{data_dir}/{name}/{version}`.
      version: dataset version "MAJOR.MINOR.PATCH".

    The class is not put in the TFDS registry (so several can coexist); read the prepared data
    with `load_tfds(directory, split)`.
    """
    tfds = _import_tfds()
    split_files = {split: str(path) for split, path in split_files.items()}
    if not split_files:
        raise ValueError("split_files must name at least one split, got {}")

    class QABuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)

        def _info(self):
            text = tfds.features.Text()
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict(
                    {
                        "id": text,
                        "question": text,
                        "golden_answers": tfds.features.Sequence(text),
                        "data_source": text,
                    }
                ),
                description="ZeroSearch QA examples (question, gold answers).",
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            del dl_manager  # Sources are local or already-downloaded files.
            return {split: self._generate_examples(path) for split, path in split_files.items()}

        def _generate_examples(self, path):
            # Keys are row indices: ids are only unique within a source, not guaranteed globally.
            for index, example in enumerate(load_file(path)):
                yield index, examples_to_tfds_features(example)

    QABuilder.name = name
    return QABuilder


def load_tfds(
    name_or_dir: str | Path,
    split: str,
    *,
    data_dir: str | None = None,
    limit: int | None = None,
) -> list[QAExample]:
    """Read a prepared TFDS QA dataset into `QAExample`s, in stored order.

    Args:
      name_or_dir: a prepared dataset directory `{data_dir}/{name}/{version}` (local or a URL
        such as `gs://...`), or the name of a registered TFDS dataset.
      split: split name, e.g. "test" (TFDS slicing such as "test[:500]" works too).
      data_dir: where registered datasets live (name form only).
      limit: keep at most this many examples.
    """
    tfds = _import_tfds()
    name_or_dir = str(name_or_dir)
    if "://" in name_or_dir or os.path.isdir(name_or_dir):
        builder = tfds.builder_from_directory(name_or_dir)
    else:
        builder = tfds.builder(name_or_dir, data_dir=data_dir)
    dataset = builder.as_dataset(split=split, shuffle_files=False)
    if limit is not None:
        dataset = dataset.take(limit)
    return [tfds_features_to_example(features) for features in tfds.as_numpy(dataset)]
