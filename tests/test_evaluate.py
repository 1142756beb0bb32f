"""The evaluation harness: datasets, config errors, tables, parquet vs jsonl, kill and resume.

End-to-end runs use the tiny random policy (tests/train_utils.py) and a BM25 engine over a few
in-test passages: the harness, not the model, is under test.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import shared_data_dir
from tests.test_data_qa import _upstream_row, _write_upstream_parquet
from tests.train_utils import tiny_policy_dir
from zerosearch_jax import evaluate as ev
from zerosearch_jax.data.qa import DataError
from zerosearch_jax.train import ConfigError

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    ("q0", "What is the capital of France?", ["Paris"]),
    ("q1", "Who wrote Hamlet?", ["William Shakespeare", "Shakespeare"]),
    ("q2", "In which year did Apollo 11 land on the Moon?", ["1969"]),
    ("q3", "Which river flows through Cairo?", ["Nile", "the Nile River"]),
    ("q4", "What is the largest planet?", ["Jupiter"]),
    ("q5", "Who painted the Mona Lisa?", ["Leonardo da Vinci"]),
]
PASSAGES = [
    ("Paris", "Paris is the capital and largest city of France."),
    ("Hamlet", "Hamlet is a tragedy written by William Shakespeare around 1600."),
    ("Apollo 11", "Apollo 11 landed the first humans on the Moon in July 1969."),
    ("Nile", "The Nile flows north through Egypt and its capital Cairo."),
    ("Jupiter", "Jupiter is the largest planet in the Solar System."),
    ("Mona Lisa", "The Mona Lisa is a portrait painted by Leonardo da Vinci."),
]


def _config(policy_path, corpus_path, /, **overrides):
    sys.path.insert(0, str(ROOT))
    from configs import evaluate as evaluate_config

    c = evaluate_config.get_config()
    c.update({"model": policy_path, "dtype": "float32", "engine": "bm25",
              "corpus": str(corpus_path),
              "topk": 2, "sample_size": -1, "batch_size": 2, "max_new_tokens": 8,
              "cot_max_new_tokens": 8, "methods": "direct,rag,agent"})
    c.agent.update({"max_turns": 1, "max_new_tokens": 8, "max_obs_tokens": 64})
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _flags(config_overrides: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in config_overrides.items()]


def _cli_overrides(policy, corpus, datasets, **extra):
    return {"model": policy, "dtype": "float32", "corpus": corpus, "topk": 2,
            "sample_size": -1, "batch_size": 2, "max_new_tokens": 8, "cot_max_new_tokens": 8,
            "methods": "direct,rag,agent", "agent.max_turns": 1, "agent.max_new_tokens": 8,
            "agent.max_obs_tokens": 64, "datasets": datasets, **extra}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def policy(tmp_path_factory, smollm2_tokenizer):
    return tiny_policy_dir(tmp_path_factory.mktemp("policy"), smollm2_tokenizer)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rows = [{"id": str(i), "contents": f'"{t}"\n{x}'} for i, (t, x) in enumerate(PASSAGES)]
    return _write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", rows)


@pytest.fixture(scope="module")
def qa_files(tmp_path_factory):
    """The same questions as a FlashRAG jsonl and as an upstream-format parquet."""
    d = tmp_path_factory.mktemp("qa")
    jsonl = _write_jsonl(d / "toy_test.jsonl", [
        {"id": i, "question": q, "golden_answers": a, "data_source": "toy"}
        for i, q, a in QUESTIONS])
    rows = [_upstream_row(n, q, a) | {"id": i} for n, (i, q, a) in enumerate(QUESTIONS)]
    parquet = _write_upstream_parquet(d / "toy_search_test.parquet", rows,
                                      drop_golden_answers=True)  # gold from reward_model
    return jsonl, parquet


# ---------------------------------------------------------------------------------------------
# Scores and tables
# ---------------------------------------------------------------------------------------------


def _rec(method, dataset, i, em, cover_em, f1, searches):
    return {"method": method, "dataset": dataset, "id": str(i), "em": em, "cover_em": cover_em,
            "f1": f1, "searches": searches}


def test_aggregate_and_tables_hand_computed():
    records = [
        _rec("direct", "nq", 0, 1.0, 1.0, 1.0, 0), _rec("direct", "nq", 1, 0.0, 1.0, 0.5, 0),
        _rec("direct", "nq", 2, 0.0, 0.0, 0.0, 0), _rec("direct", "nq", 3, 0.0, 0.0, 0.25, 0),
        _rec("direct", "hotpotqa", 0, 1.0, 1.0, 1.0, 0),
        _rec("agent", "nq", 0, 0.0, 1.0, 0.4, 2), _rec("agent", "nq", 1, 0.0, 0.0, 0.0, 1),
        _rec("agent", "other", 9, 1.0, 1.0, 1.0, 5),  # not in the datasets asked for
    ]
    table = ev.aggregate(records, ["direct", "agent"], ["nq", "hotpotqa"])
    assert table[("direct", "nq")] == {"n": 4, "cover_em": 0.5, "em": 0.25, "f1": 0.4375,
                                       "searches": 0.0}
    # Avg is the mean of the dataset means (the paper's), not of the 5 questions.
    assert table[("direct", "Avg")] == pytest.approx(
        {"n": 5, "cover_em": 0.75, "em": 0.625, "f1": 0.71875, "searches": 0.0})
    assert table[("agent", "nq")] == pytest.approx(
        {"n": 2, "cover_em": 0.5, "em": 0.0, "f1": 0.2, "searches": 1.5})
    assert ("agent", "hotpotqa") not in table
    assert table[("agent", "Avg")] == table[("agent", "nq")]

    md = ev.markdown_tables(table, ["direct", "agent"], ["nq", "hotpotqa"])
    assert "| method | nq | hotpotqa | Avg |" in md
    assert "| Direct answer | 50.00 | 100.00 | 75.00 |" in md  # cover EM, first table
    assert "| Search agent | 50.00 | - | 50.00 |" in md
    assert "| Search agent | 1.50 | - | 1.50 |" in md  # searches per question
    assert "Questions per dataset: nq 4, hotpotqa 1." in md
    rows = ev.csv_table(table, ["direct", "agent"], ["nq", "hotpotqa"]).splitlines()
    assert rows[0] == "method,dataset,questions,cover_em,em,f1,searches"
    assert rows[1] == "direct,nq,4,0.500000,0.250000,0.437500,0.000000"
    assert rows[3] == "direct,Avg,5,0.750000,0.625000,0.718750,0.000000"
    assert rows[-1] == "agent,Avg,2,0.500000,0.000000,0.200000,1.500000"


def test_read_traces_drops_only_a_cut_last_line(tmp_path, caplog):
    path = tmp_path / "traces.jsonl"
    good = [_rec("direct", "nq", i, 1.0, 1.0, 1.0, 0) for i in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"method": "dir')
    assert ev.read_traces(path) == good
    assert "truncated last line" in caplog.text
    ev.read_traces(path, repair=True)
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in good)
    # A complete last record that only lacks its newline is kept, and the newline restored.
    path.write_text(json.dumps(good[0]) + "\n" + json.dumps(good[1]))
    assert ev.read_traces(path, repair=True) == good
    assert path.read_text().endswith("}\n")
    # Damage anywhere but the end is not a kill: an error naming the line.
    path.write_text(json.dumps(good[0]) + "\n{oops\n" + json.dumps(good[1]) + "\n")
    with pytest.raises(DataError, match=r"traces\.jsonl:2"):
        ev.read_traces(path)


# ---------------------------------------------------------------------------------------------
# Datasets and config errors
# ---------------------------------------------------------------------------------------------


def test_resolve_dataset_names_and_paths(tmp_path, qa_files):
    jsonl, parquet = qa_files
    (tmp_path / "nq_test.jsonl").write_text("")
    (tmp_path / "hotpotqa_dev.jsonl").write_text("")
    (tmp_path / "musique_search_test.parquet").write_text("")
    assert ev.resolve_dataset("nq", str(tmp_path)) == ev.DatasetSpec(
        "nq", str(tmp_path / "nq_test.jsonl"))
    assert ev.resolve_dataset("HotpotQA", str(tmp_path)).source == str(
        tmp_path / "hotpotqa_dev.jsonl")
    assert ev.resolve_dataset("musique", str(tmp_path)).source.endswith(
        "musique_search_test.parquet")
    # Not on disk: the FlashRAG hub dataset (qa.load_hf_dataset picks test, else dev).
    assert ev.resolve_dataset("bamboogle", str(tmp_path)) == ev.DatasetSpec(
        "bamboogle", "hf:RUC-NLPIR/FlashRAG_datasets:bamboogle")
    assert ev.resolve_dataset("popqa").source == "hf:RUC-NLPIR/FlashRAG_datasets:popqa"
    assert ev.resolve_dataset(str(parquet)) == ev.DatasetSpec("toy_search_test", str(parquet))
    assert ev.resolve_dataset(f"toy={jsonl}") == ev.DatasetSpec("toy", str(jsonl))
    assert ev.resolve_dataset("hf:org/data:cfg").name == "cfg"
    with pytest.raises(ConfigError, match=r"config\.datasets = 'squad'"):
        ev.resolve_dataset("squad")
    with pytest.raises(ConfigError, match=r"config\.datasets = .*missing\.jsonl"):
        ev.resolve_dataset(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize(("key", "value", "message"), [
    ("methods", "direct,search", "config.methods = 'direct,search'"),
    ("methods", "rag,rag", "no repeated method"),
    ("engine", "google", "config.engine = 'google'"),
    ("sample_size", 0, "config.sample_size = 0"),
    ("sample_size", -5, "config.sample_size = -5"),
    ("batch_size", 0, "config.batch_size = 0"),
    ("datasets", "nq,trivia", "config.datasets = 'trivia'"),
    ("datasets", "nq,nq", "distinct display names"),
    ("agent.max_turns", -1, "max_turns must be >= 0, got -1"),
    ("url", "", "config.url = ''"),
    ("corpus", "/no/such/corpus.jsonl", "config.corpus"),
    ("on_error", "ignore", "config.on_error = 'ignore'"),
])
def test_bad_config_values_are_named(tmp_path, key, value, message):
    c = _config("unused", "wiki", **{"output_dir": str(tmp_path), "datasets": "nq", key: value})
    if key == "url":
        c.engine = "searchr1"
    with pytest.raises(ConfigError) as err:
        ev.build_settings(c)
    assert message in str(err.value)


def test_cli_config_error_exit_code_2_before_loading_a_model(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "zerosearch_jax.evaluate", "--config=configs/evaluate.py",
         f"--workdir={out}", "--config.model=/no/such/model", "--config.methods=direct,sing"],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config.methods = 'direct,sing'" in proc.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def _per_question(path):
    """(method, id) -> the record without its dataset name, for comparing two sources."""
    return {(r["method"], r["id"]): {k: v for k, v in r.items() if k != "dataset"}
            for r in ev.read_traces(path)}


def test_upstream_parquet_and_flashrag_jsonl_give_identical_results(tmp_path, policy, corpus,
                                                                    qa_files):
    jsonl, parquet = qa_files
    reports = {}
    for name, source in (("jsonl", jsonl), ("parquet", parquet)):
        c = _config(policy, corpus, datasets=f"toy={source}")
        reports[name] = ev.evaluate(c, str(tmp_path / name))
    a, b = (_per_question(tmp_path / n / ev.TRACES_FILE) for n in ("jsonl", "parquet"))
    assert len(a) == 3 * len(QUESTIONS) and a == b
    assert a[("rag", "q1")]["golden_answers"] == ["William Shakespeare", "Shakespeare"]
    assert "Hamlet" in a[("rag", "q1")]["calls"][0]["documents"][0]  # BM25 found its passage
    assert reports["jsonl"].table == reports["parquet"].table
    assert reports["jsonl"].csv == reports["parquet"].csv


def test_shared_nq_parquet_and_jsonl_give_identical_results(tmp_path, policy, corpus):
    data = shared_data_dir()
    if data is None:
        pytest.skip("../shared/data is not available")
    results = {}
    for name in ("nq_test.jsonl", "nq_search_test.parquet"):
        c = _config(policy, corpus, datasets=f"nq={data / 'qa' / name}", sample_size=4,
                    methods="direct")
        results[name] = ev.evaluate(c, str(tmp_path / name))
    a, b = (_per_question(tmp_path / n / ev.TRACES_FILE) for n in results)
    assert len(a) == 4 and a == b
    assert results["nq_test.jsonl"].csv == results["nq_search_test.parquet"].csv


def test_killed_evaluation_resumes_to_the_uninterrupted_result(tmp_path, policy, corpus,
                                                              qa_files):
    jsonl, parquet = qa_files
    datasets = f"a={jsonl},b={parquet}"
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "zerosearch_jax.evaluate", "--config=configs/evaluate.py",
           f"--workdir={killed}", *_flags(_cli_overrides(policy, corpus, datasets))]
    log = open(tmp_path / "killed.log", "w")  # a file, not a pipe that could fill and block
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                            stdout=log, stderr=log)
    traces = killed / ev.TRACES_FILE
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if traces.exists() and traces.read_bytes().count(b"\n") >= 2:  # one batch written
            break
        time.sleep(0.02)
    assert proc.poll() is None, ("the run ended before it was killed: "
                                 f"{(tmp_path / 'killed.log').read_text()[-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    written = traces.read_bytes().count(b"\n")
    total = 3 * 2 * len(QUESTIONS)
    assert 2 <= written < total
    with open(traces, "ab") as f:  # as if the kill had cut a write in half
        f.write(b'{"method": "agent", "dataset": "b", "id": "q')

    resumed = ev.evaluate(_config(policy, corpus, datasets=datasets), str(killed))
    assert resumed.throughput and sum(t["questions"] for t in resumed.throughput.values()) \
        == total - written  # only the missing questions ran
    full = ev.evaluate(_config(policy, corpus, datasets=datasets), str(tmp_path / "full"))
    for name in (ev.RESULTS_MD, ev.RESULTS_CSV):
        assert (killed / name).read_text() == (tmp_path / "full" / name).read_text()
    key = lambda r: ev.trace_key(r)  # noqa: E731
    assert sorted(ev.read_traces(traces), key=key) == sorted(
        ev.read_traces(tmp_path / "full" / ev.TRACES_FILE), key=key)
    assert resumed.table == full.table
    # Everything is done: a third run scores nothing new and rewrites the same tables.
    again = ev.evaluate(_config(policy, corpus, datasets=datasets), str(killed))
    assert again.throughput == {} and again.csv == full.csv


def test_resume_with_other_result_settings_is_refused(tmp_path, policy, corpus, qa_files):
    jsonl, _ = qa_files
    c = _config(policy, corpus, datasets=f"toy={jsonl}", methods="direct", sample_size=2)
    ev.evaluate(c, str(tmp_path))
    with pytest.raises(ConfigError, match=r"config\.max_new_tokens = 9"):
        ev.evaluate(_config(policy, corpus, datasets=f"toy={jsonl}", methods="direct",
                            sample_size=2, max_new_tokens=9), str(tmp_path))


def test_second_evaluation_in_a_running_workdir_is_refused(tmp_path, qa_files):
    import fcntl

    jsonl, _ = qa_files
    c = _config("unused", "wiki", datasets=f"toy={jsonl}", methods="direct")
    with open(tmp_path / ev.LOCK_FILE, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running evaluation holds it
        with pytest.raises(ConfigError, match="another evaluation is running"):
            ev.evaluate(c, str(tmp_path))
    assert not (tmp_path / ev.TRACES_FILE).exists()


def test_cli_runs_cot_and_prints_the_agent_throughput(tmp_path, policy, corpus, qa_files):
    jsonl, _ = qa_files
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "zerosearch_jax.evaluate", "--config=configs/evaluate.py",
         f"--workdir={out}",
         *_flags(_cli_overrides(policy, corpus, f"toy={jsonl}", methods="cot,agent"))],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| Chain of thought |" in proc.stdout and "| Search agent |" in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if x.startswith("throughput agent:"))
    assert f"{len(QUESTIONS)} questions in" in line and line.endswith(
        "questions/s (compilation included)")
    assert json.loads((out / ev.THROUGHPUT_FILE).read_text())["agent"]["questions"] == len(
        QUESTIONS)
