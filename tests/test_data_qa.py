"""Tests for zerosearch_jax.data.qa (QA loaders) and the pure parts of data.tfds_builder."""

import json
import logging
import os
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zerosearch_jax.data import qa
from zerosearch_jax.data.qa import (
    DataError,
    QAExample,
    examples_from_dataset,
    load_hf_dataset,
    load_jsonl,
    load_parquet,
    sample,
)
from zerosearch_jax.data.sources import load_qa
from zerosearch_jax.data.tfds_builder import (
    examples_to_tfds_features,
    make_builder_class,
    tfds_features_to_example,
)

PROMPT = "Answer the given question. ... For example, <answer> Beijing </answer>. Question: {q}\n"


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), "utf-8"
    )
    return path


def _upstream_row(i: int, question: str, answers: list[str]) -> dict:
    """A row in the exact upstream ZeroSearch / Search-R1 parquet layout."""
    return {
        "id": f"test_{i}",
        "question": question,
        "golden_answers": answers,
        "data_source": "nq",
        "prompt": [{"content": PROMPT.format(q=question), "role": "user"}],
        "ability": "fact-reasoning",
        "reward_model": {"ground_truth": {"target": answers}, "style": "rule"},
        "extra_info": {"index": i, "split": "test"},
    }


def _write_upstream_parquet(path: Path, rows, drop_golden_answers=False) -> Path:
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("question", pa.string()),
            ("golden_answers", pa.list_(pa.string())),
            ("data_source", pa.string()),
            ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
            ("ability", pa.string()),
            (
                "reward_model",
                pa.struct(
                    [
                        ("ground_truth", pa.struct([("target", pa.list_(pa.string()))])),
                        ("style", pa.string()),
                    ]
                ),
            ),
            ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string())])),
        ]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    if drop_golden_answers:
        table = table.drop_columns(["golden_answers"])
    pq.write_table(table, path)
    return path


# ---------------------------------------------------------------------------------------------
# jsonl
# ---------------------------------------------------------------------------------------------


def test_jsonl_roundtrip_and_answer_keys(tmp_path):
    path = _write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"id": "a", "question": " who? ", "golden_answers": ["X", "Y"], "data_source": "nq"},
            "",  # blank lines are ignored
            {"id": 7, "question": "single string gold?", "golden_answers": "Z"},
            {"question": "answers key?", "answers": ["P", " ", None]},
            {"question": "answer key?", "answer": 1969, "data_source": ""},
        ],
    )
    assert load_jsonl(path) == [
        QAExample("a", "who?", ("X", "Y"), "nq"),
        QAExample("7", "single string gold?", ("Z",), "mixed"),
        QAExample("mixed_2", "answers key?", ("P",), "mixed"),
        QAExample("mixed_3", "answer key?", ("1969",), "mixed"),
    ]
    assert [e.data_source for e in load_jsonl(path, data_source="hotpotqa")] == [
        "nq", "hotpotqa", "hotpotqa", "hotpotqa"
    ]
    assert [e.id for e in load_jsonl(path, limit=2)] == ["a", "7"]
    assert load_jsonl(path, limit=0) == []


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        ('{"question": "q?", "golden_answers": ["a"]', "invalid JSON"),
        ('["not", "an", "object"]', "not a JSON object"),
        ('{"golden_answers": ["a"]}', "question"),
        ('{"question": "   ", "golden_answers": ["a"]}', "question"),
        ('{"question": "q?", "golden_answers": []}', "gold answers"),
        ('{"question": "q?"}', "gold answers"),
        ('{"question": "q?", "golden_answers": ["a"], "bridge_answers": "B"}', "bridge_answers"),
        ('{"question": "q?", "golden_answers": ["a"], "bridge_answers": [""]}', "bridge_answers"),
    ],
)
def test_jsonl_malformed_row_raises_with_file_and_line(tmp_path, bad_line, reason):
    good = {"question": "fine?", "golden_answers": ["ok"]}
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, "", bad_line, good])
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: .*{reason}"):
        load_jsonl(path)


def test_jsonl_malformed_row_skip_logs_file_and_line(tmp_path, caplog):
    path = _write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"question": "one?", "golden_answers": ["1"]},
            "{oops",
            {"question": "two?", "answer": "2"},
        ],
    )
    with caplog.at_level(logging.WARNING, logger=qa.__name__):
        examples = load_jsonl(path, on_error="skip")
    assert [e.question for e in examples] == ["one?", "two?"]
    assert f"{path}:2" in caplog.text and "invalid JSON" in caplog.text


def test_bad_on_error_and_limit(tmp_path):
    path = _write_jsonl(tmp_path / "x.jsonl", [{"question": "q?", "answer": "a"}])
    with pytest.raises(ValueError, match="'ignore'"):
        load_jsonl(path, on_error="ignore")
    with pytest.raises(ValueError, match="-1"):
        load_jsonl(path, limit=-1)


# ---------------------------------------------------------------------------------------------
# parquet (upstream layout)
# ---------------------------------------------------------------------------------------------


def test_upstream_parquet_roundtrip(tmp_path):
    question = "who got the first nobel prize in physics?"
    rows = [
        _upstream_row(0, question, ["Wilhelm Röntgen"]),
        _upstream_row(1, "which mode?", ["Olivia", "MFSK"]),
    ]
    path = _write_upstream_parquet(tmp_path / "nq_search_test.parquet", rows)
    expected = [
        QAExample("test_0", question, ("Wilhelm Röntgen",), "nq"),
        QAExample("test_1", "which mode?", ("Olivia", "MFSK"), "nq"),
    ]
    assert load_parquet(path) == expected
    assert load_qa(path) == expected
    assert load_qa(str(path), limit=1) == expected[:1]


def test_parquet_gold_from_reward_model(tmp_path):
    rows = [_upstream_row(0, "q0?", ["a0"]), _upstream_row(1, "q1?", ["a1", "b1"])]
    path = _write_upstream_parquet(tmp_path / "no_gold.parquet", rows, drop_golden_answers=True)
    assert [e.golden_answers for e in load_parquet(path)] == [("a0",), ("a1", "b1")]
    # A null golden_answers cell also falls back to the reward model target.
    rows[1]["golden_answers"] = None
    path = _write_upstream_parquet(tmp_path / "null_gold.parquet", rows)
    assert load_parquet(path)[1].golden_answers == ("a1", "b1")


def test_parquet_malformed_row(tmp_path, caplog):
    rows = [_upstream_row(i, f"q{i}?", [f"a{i}"]) for i in range(3)]
    rows[1]["question"] = ""
    path = _write_upstream_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(DataError, match=r"bad\.parquet:row 2: .*question"):
        load_parquet(path)
    with caplog.at_level(logging.WARNING, logger=qa.__name__):
        assert [e.id for e in load_parquet(path, on_error="skip")] == ["test_0", "test_2"]
    assert f"{path}:row 2" in caplog.text


def test_parquet_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_parquet(tmp_path / "nope.parquet")


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets (no hub on CI: the hub calls are replaced)
# ---------------------------------------------------------------------------------------------

FLASHRAG_ROWS = [
    {"id": "test_0", "question": "who?", "golden_answers": ["A"], "metadata": {"x": 1}},
    {"id": "test_1", "question": "what?", "golden_answers": ["B", "C"], "metadata": {"x": 2}},
]


def test_examples_from_dataset():
    dataset = datasets.Dataset.from_list(FLASHRAG_ROWS)
    assert examples_from_dataset(dataset, name="nq[test]", data_source="nq") == [
        QAExample("test_0", "who?", ("A",), "nq"),
        QAExample("test_1", "what?", ("B", "C"), "nq"),
    ]
    bad = datasets.Dataset.from_list([FLASHRAG_ROWS[0], {**FLASHRAG_ROWS[1], "golden_answers": []}])
    with pytest.raises(DataError, match=r"nq\[test\]:row 2"):
        examples_from_dataset(bad, name="nq[test]")


def test_load_hf_dataset_unreachable_hub_names_the_id(monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'RUC-NLPIR/FlashRAG_datasets' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    monkeypatch.setattr(datasets, "get_dataset_split_names", unreachable)
    with pytest.raises(DataError, match=r"'RUC-NLPIR/FlashRAG_datasets' \(config 'nq'") as info:
        load_hf_dataset("RUC-NLPIR/FlashRAG_datasets", "nq")
    assert isinstance(info.value.__cause__, ConnectionError)
    with pytest.raises(DataError, match="split 'dev'"):
        load_qa("hf:RUC-NLPIR/FlashRAG_datasets:nq", split="dev")


def test_load_hf_dataset_default_split(monkeypatch):
    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(FLASHRAG_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda n, c: ["train", "dev"])
    examples = load_qa("hf:RUC-NLPIR/FlashRAG_datasets:nq", limit=1)
    assert calls == [("RUC-NLPIR/FlashRAG_datasets", "nq", "dev")]  # no test split: dev
    assert examples == [QAExample("test_0", "who?", ("A",), "nq")]
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda n, c: ["train"])
    with pytest.raises(DataError, match=r"pass split= one of \['train'\]"):
        load_hf_dataset("some/set")


# ---------------------------------------------------------------------------------------------
# Dispatcher and sampling
# ---------------------------------------------------------------------------------------------


def test_load_qa_dispatch_errors(tmp_path):
    with pytest.raises(ValueError, match=r"'data\.csv'.*\.jsonl or \.parquet"):
        load_qa("data.csv")
    path = _write_jsonl(tmp_path / "x.jsonl", [{"question": "q?", "answer": "a"}])
    assert load_qa(path) == [QAExample("x_0", "q?", ("a",), "x")]
    with pytest.raises(ValueError, match="split='test'"):
        load_qa(path, split="test")
    with pytest.raises(FileNotFoundError):
        load_qa(tmp_path / "missing.jsonl")


def test_sample():
    examples = [QAExample(str(i), f"q{i}?", ("a",), "s") for i in range(100)]
    subset = sample(examples, 10, seed=0)
    assert len(subset) == 10 and len(set(subset)) == 10
    assert subset == sample(examples, 10, seed=0)
    assert subset != sample(examples, 10, seed=1)
    assert [int(e.id) for e in subset] == sorted(int(e.id) for e in subset)  # original order
    assert sample(examples, None, seed=0) == examples
    assert sample(examples, 500, seed=0) == examples
    with pytest.raises(ValueError, match="-1"):
        sample(examples, -1, seed=0)


def test_stratified_sample_shares_the_questions_evenly_among_sources():
    examples = ([QAExample(f"s{i}", "q?", ("a",), "single") for i in range(90)]
                + [QAExample(f"m{i}", "q?", ("a",), "multi") for i in range(30)]
                + [QAExample(f"r{i}", "q?", ("a",), "rare") for i in range(3)])
    subset = sample(examples, 64, seed=0, stratify=True)
    count = {src: sum(e.data_source == src for e in subset) for src in ("single", "multi",
                                                                        "rare")}
    # 64 over 3 sources: the rare one gives its 3, the rest is split as evenly as it goes.
    assert count == {"single": 31, "multi": 30, "rare": 3}
    assert len(set(subset)) == 64 and subset == sample(examples, 64, seed=0, stratify=True)
    order = [examples.index(e) for e in subset]
    assert order == sorted(order)  # original order
    even = sample(examples[:120], 64, seed=3, stratify=True)
    assert sum(e.data_source == "multi" for e in even) == 30  # all 30: fewer than 32
    assert sample(examples, 10, seed=0, stratify=False) == sample(examples, 10, seed=0)


# ---------------------------------------------------------------------------------------------
# TFDS builder (the tensorflow-free parts; the full build needs tensorflow-datasets)
# ---------------------------------------------------------------------------------------------


def test_tfds_feature_conversion_roundtrip():
    example = QAExample("test_2", "which mode?", ("Olivia", "MFSK"), "nq")
    features = examples_to_tfds_features(example)
    assert features == {
        "id": "test_2",
        "question": "which mode?",
        "golden_answers": ["Olivia", "MFSK"],
        "data_source": "nq",
    }
    assert tfds_features_to_example(features) == example
    as_numpy = {k: [s.encode() for s in v] if isinstance(v, list) else v.encode()
                for k, v in features.items()}  # what tfds.as_numpy yields
    assert tfds_features_to_example(as_numpy) == example


def test_tfds_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install tensorflow-datasets tensorflow"):
        make_builder_class({"test": "x.jsonl"})


def test_tfds_build_and_load(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from zerosearch_jax.data.tfds_builder import load_tfds

    path = _write_jsonl(
        tmp_path / "t.jsonl",
        [{"id": f"t{i}", "question": f"q{i}?", "golden_answers": [f"a{i}", "b"]} for i in range(5)],
    )
    builder_cls = make_builder_class({"test": path}, name="zerosearch_qa_test")
    builder = builder_cls(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare()
    assert load_tfds(builder.data_dir, "test") == load_jsonl(path)
    assert load_qa(f"tfds:{builder.data_dir}", split="test", limit=2) == load_jsonl(path)[:2]


# ---------------------------------------------------------------------------------------------
# Optional: the real upstream files in ../shared/data (skipped when absent)
# ---------------------------------------------------------------------------------------------


def _shared_qa_dir() -> Path:
    root = os.environ.get("ZEROSEARCH_SHARED_DATA")
    root = Path(root) if root else Path(__file__).resolve().parents[2] / "shared" / "data"
    qa_dir = root / "qa"
    if not qa_dir.is_dir():
        pytest.skip(f"shared QA data not found at {qa_dir} (set ZEROSEARCH_SHARED_DATA)")
    return qa_dir


@pytest.mark.parametrize(
    "parquet_name, jsonl_name",
    [
        ("nq_search_test.parquet", "nq_test.jsonl"),
        ("nq_search_train_first5000.parquet", "nq_train_first5000.jsonl"),
    ],
)
def test_shared_upstream_parquet_matches_jsonl(parquet_name, jsonl_name):
    qa_dir = _shared_qa_dir()
    from_parquet = load_qa(qa_dir / parquet_name)
    from_jsonl = load_qa(qa_dir / jsonl_name)
    assert len(from_parquet) == len(from_jsonl) > 1000
    assert [(e.id, e.question, e.golden_answers) for e in from_parquet] == [
        (e.id, e.question, e.golden_answers) for e in from_jsonl
    ]
    assert {e.data_source for e in from_parquet} == {"nq"}


def test_shared_single_string_gold_sets():
    qa_dir = _shared_qa_dir()
    for name in ("bamboogle_test.jsonl", "hotpotqa_dev.jsonl"):
        examples = load_qa(qa_dir / name, limit=50)
        assert len(examples) == 50
        assert all(len(e.golden_answers) >= 1 and e.question for e in examples)


def _kinds(n_single, n_multi):
    return [QAExample(str(i), f"q{i}", ("a",), "multi" if i < n_multi else "single")
            for i in range(n_single + n_multi)]


def test_training_order_is_a_per_epoch_permutation_and_resumes():
    from zerosearch_jax.data.iterator import DataIterator

    examples = _kinds(20, 10)
    it = DataIterator(examples, seed=3)
    first = [e.id for _ in range(3) for e in it.next_batch(8)]  # 24 of 30, then epoch 1
    assert len(set(first[:24])) == 24 and it.state() == {"epoch": 0, "index": 24}
    nxt = [e.id for e in it.next_batch(8)]  # 6 left < 8: the next epoch's permutation
    assert it.state() == {"epoch": 1, "index": 8}
    again = DataIterator(examples, seed=3)
    again.restore({"epoch": 0, "index": 24})
    assert [e.id for e in again.next_batch(8)] == nxt


def test_stratified_batches_hold_each_source_equally():
    """Ten two-hop and twenty single-hop questions: every batch of 4 is two of each, an epoch
    is 20 questions (the smaller source used up, each question once), and resuming from the
    saved position gives the same batches."""
    from zerosearch_jax.data.iterator import DataIterator

    examples = _kinds(20, 10)
    it = DataIterator(examples, seed=0, stratify=True)
    epoch0 = [it.next_batch(4) for _ in range(5)]
    for batch in epoch0:
        assert sorted(e.data_source for e in batch) == ["multi", "multi", "single", "single"]
    ids = [e.id for b in epoch0 for e in b]
    assert len(set(ids)) == 20 and {e.id for e in examples[:10]} <= set(ids)
    state = it.state()
    nxt = [e.id for e in it.next_batch(4)]
    assert it.state() == {"epoch": 1, "index": 4}
    resumed = DataIterator(examples, seed=0, stratify=True)
    resumed.restore(state)
    assert [e.id for e in resumed.next_batch(4)] == nxt
    with pytest.raises(ValueError, match="2 sources of at least 10 each"):
        DataIterator(examples, seed=0, stratify=True).next_batch(24)
