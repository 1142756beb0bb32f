"""Operator-facing failure cases: poison rows, damaged checkpoints, the retrieval server under
load, secrets in logs, config gaps. Each case is reproduced for real (files on disk, sockets,
orbax checkpoints) and must end in a clear error or a handled, logged outcome."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import requests

from configs import default as default_config
from zerosearch_jax import agent, checkpoints, hooks, inputs, train
from zerosearch_jax.data import qa
from zerosearch_jax.search import BM25SearchEngine, Passage, SerpAPIClient
from zerosearch_jax.search import server as server_lib


def _write(path, lines):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


# -- data -----------------------------------------------------------------------------------


def test_a_non_utf8_line_is_that_lines_error_only(tmp_path, caplog):
    good = json.dumps({"question": "Who?", "golden_answers": ["x"]}).encode()
    path = _write(tmp_path / "qa.jsonl", [good, b'{"question": "caf\xe9?", "answer": "y"}', good])
    with caplog.at_level(logging.WARNING):
        assert len(qa.load_jsonl(path, on_error="skip")) == 2
    assert f"{path}:2" in caplog.text and "not UTF-8" in caplog.text
    with pytest.raises(qa.DataError, match=f"{path}:2: not UTF-8"):
        qa.load_jsonl(path)


@pytest.mark.parametrize("answers", [{"a": 1}, True, [["y", "z"]], float("nan"), ["ok", False]])
def test_garbage_gold_answers_are_refused_not_stringified(tmp_path, answers):
    row = json.dumps({"question": "Who?", "golden_answers": answers}).encode()
    path = _write(tmp_path / "qa.jsonl", [row])
    assert qa.load_jsonl(path, on_error="skip") == []
    with pytest.raises(qa.DataError, match="gold answer"):
        qa.load_jsonl(path)


def test_numbers_stay_valid_answers(tmp_path):
    row = json.dumps({"question": "When?", "golden_answers": [1969, "July 1969", 3.5]}).encode()
    [ex] = qa.load_jsonl(_write(tmp_path / "qa.jsonl", [row]))
    assert ex.golden_answers == ("1969", "July 1969", "3.5")


def test_a_non_parquet_file_is_named(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_text("not parquet")
    with pytest.raises(qa.DataError, match="train.parquet: not a readable parquet file"):
        qa.load_parquet(path)


def test_questions_too_long_for_the_prompt_follow_on_error(smollm2_tokenizer, caplog):
    rc = agent.RolloutConfig(max_prompt_tokens=256)
    ok = qa.QAExample("ok", "Who wrote Hamlet?", ("Shakespeare",), "t")
    long = qa.QAExample("long", "word " * 400, ("x",), "t")
    huge = qa.QAExample("huge", "x" * 10_000_000, ("x",), "t")  # refused before tokenizing
    with caplog.at_level(logging.WARNING):
        kept = inputs.admissible([ok, long, huge], smollm2_tokenizer, rc, "skip")
    assert kept == [ok]
    assert "'long'" in caplog.text and "'huge'" in caplog.text and "10000000 characters" in \
        caplog.text
    with pytest.raises(qa.DataError, match="question 'long'.*max_prompt_tokens=256"):
        inputs.admissible([ok, long], smollm2_tokenizer, rc, "raise")


# -- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, match", [
    ("simulator.max_new_tokens", -1, "config.simulator.max_new_tokens = -1"),
    ("max_nonfinite_steps", -1, "config.max_nonfinite_steps = -1"),
    ("rollout.engine", "fast", "config.rollout.engine = 'fast'"),
    ("simulator.variant", "tuned", "config.simulator.variant = 'tuned'"),
    ("validation.topk", 0, "config.validation.topk = 0"),
    ("optim.b2", 1.0, "config.optim.b2 = 1.0"),
])
def test_config_gaps_name_the_key(key, value, match):
    c = default_config.get_config()
    with c.unlocked():
        section, _, name = key.rpartition(".")
        (c[section] if section else c)[name] = value
    with pytest.raises(train.ConfigError, match=match):
        train.build_settings(c)


def test_a_missing_model_names_its_key(tmp_path):
    c = default_config.get_config()
    c.simulator.model = str(tmp_path / "no_such_simulator")
    with pytest.raises(train.ConfigError, match="config.simulator.model"):
        train.check_models(c)


def test_a_missing_data_file_names_its_key(tmp_path):
    c = default_config.get_config()
    with pytest.raises(train.ConfigError, match="config.data.train"):
        inputs.load_examples(str(tmp_path / "nope.jsonl"), c, key="data.train")


# -- checkpoints ----------------------------------------------------------------------------


def _state(seed):
    k = jax.random.key(seed)
    return {"w": jax.random.normal(k, (64, 64)), "m": jnp.full((4096,), float(seed)),
            "step": jnp.int32(seed)}


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _manager(path):
    return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=3,
                                                                             create=True))


@pytest.mark.parametrize("damage", ["random_bytes", "truncate", "empty_metadata"])
def test_a_damaged_latest_step_falls_back_to_the_previous_one(tmp_path, damage, caplog):
    manager = _manager(tmp_path / "ckpt")
    for step in (1, 2):
        checkpoints.save(manager, step, _state(step), {"step": step})
    step_dir = tmp_path / "ckpt" / "2"
    if damage == "empty_metadata":
        (step_dir / "meta" / "metadata").write_text("")
    else:
        target = max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
                     key=lambda p: p.stat().st_size)
        data = bytearray(target.read_bytes())
        if damage == "truncate":
            target.write_bytes(bytes(data[:len(data) // 3]))
        else:
            rng = np.random.default_rng(0)
            start = len(data) // 2
            data[start:start + 4096] = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
            target.write_bytes(bytes(data))
    manager = _manager(tmp_path / "ckpt")
    with caplog.at_level(logging.WARNING):
        step, state, meta = checkpoints.restore_latest_intact(manager, _abstract(_state(0)))
    assert step == 1 and meta["step"] == 1
    np.testing.assert_array_equal(state["w"], _state(1)["w"])
    assert "step 2 is damaged" in caplog.text
    assert (tmp_path / "ckpt" / "2.corrupt").exists()  # set aside, not deleted
    assert manager.all_steps() == [1]


def test_no_intact_step_is_an_error_not_a_fresh_start(tmp_path):
    manager = _manager(tmp_path / "ckpt")
    checkpoints.save(manager, 1, _state(1), {"step": 1})
    (tmp_path / "ckpt" / "1" / "meta" / "metadata").write_text("")
    with pytest.raises(RuntimeError, match="no intact checkpoint.*step 1"):
        checkpoints.restore_latest_intact(_manager(tmp_path / "ckpt"), _abstract(_state(0)))


def test_an_intact_step_restores_as_saved(tmp_path):
    manager = _manager(tmp_path / "ckpt")
    checkpoints.save(manager, 3, _state(3), {"step": 3})
    step, state, _ = checkpoints.restore_latest_intact(manager, _abstract(_state(0)))
    assert step == 3
    jax.tree.map(np.testing.assert_array_equal, state, _state(3))
    assert checkpoints.restore_latest_intact(_manager(tmp_path / "empty"),
                                             _abstract(_state(0))) is None


def _small_disk(monkeypatch, free: int):
    """The disk as `shutil.disk_usage` reports it, with `free` bytes left."""
    real = shutil.disk_usage
    monkeypatch.setattr(checkpoints.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=free))


def test_a_full_disk_stops_a_save_before_it_writes_and_keeps_the_saved_steps(
        tmp_path, monkeypatch):
    manager = _manager(tmp_path / "ckpt")
    checkpoints.save(manager, 1, _state(1), {"step": 1})
    _small_disk(monkeypatch, free=checkpoints.state_bytes(_state(2)))  # no room for the margin
    with pytest.raises(checkpoints.DiskSpaceError, match=r"checkpoint step 2 .* GB free"):
        checkpoints.save(manager, 2, _state(2), {"step": 2})
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["1"]  # nothing of step 2 was written
    monkeypatch.undo()
    step, state, _ = checkpoints.restore_latest_intact(_manager(tmp_path / "ckpt"),
                                                       _abstract(_state(0)))
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, state, _state(1))


_FAILING_SAVE = """
import resource, signal, sys
import jax, jax.numpy as jnp
import orbax.checkpoint as ocp
from zerosearch_jax import checkpoints
path = sys.argv[1]
manager = ocp.CheckpointManager(
    path, options=ocp.CheckpointManagerOptions(max_to_keep=3, create=True))
checkpoints.save(manager, 1, {"w": jnp.ones((256, 256))}, {"step": 1})
# From here a write past 64 KB fails (EFBIG) as it would on a full disk.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
try:
    # Random values: compression cannot bring them under the limit.
    w = jax.random.normal(jax.random.key(0), (256, 256))
    checkpoints.save(manager, 2, {"w": w}, {"step": 2})
except Exception as e:
    print("FAILED", type(e).__name__)
"""


def test_a_save_that_fails_part_way_leaves_no_partial_step(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _FAILING_SAVE, str(tmp_path / "ckpt")],
                          capture_output=True, text=True, timeout=300)
    assert "FAILED" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["1"]
    step, state, _ = checkpoints.restore_latest_intact(
        _manager(tmp_path / "ckpt"), {"w": jax.ShapeDtypeStruct((256, 256), jnp.float32)})
    assert step == 1 and float(state["w"][0, 0]) == 1.0


def test_a_run_without_room_for_its_checkpoints_stops_before_the_loop(tmp_path, monkeypatch):
    ckpt = hooks.Checkpointer(str(tmp_path), keep=2, every=3)
    state = _state(1)
    size = checkpoints.state_bytes(state)
    # 6 steps saved every 3: two steps kept, 2 x the state; plus a 1 MB export.
    _small_disk(monkeypatch, free=2 * size + 2**20 + 70 * 2**20)
    ckpt.require_room(state, start=0, total=6, export_bytes=2**20)
    _small_disk(monkeypatch, free=2 * size + 2**20)
    with pytest.raises(checkpoints.DiskSpaceError,
                       match=r"this run's checkpoints .*checkpoint.keep=2.* final export"):
        ckpt.require_room(state, start=0, total=6, export_bytes=2**20)


# -- the retrieval server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_url():
    passages = [Passage(str(i), f"title {i}", f"passage {i} about topic {i % 7}")
                for i in range(20)]
    server, url = server_lib.serve_in_thread(BM25SearchEngine.build(passages, topk=2))
    yield url
    server.shutdown()
    server.server_close()


def test_200_clients_x_5_rounds_are_all_answered_and_health_stays_up(server_url, capsys):
    from benchmarks.server_load import run_load

    r = run_load(server_url, clients=200, rounds=5, queries=[f"topic {i}" for i in range(7)])
    print(r)
    assert r["answered"] == r["requests"] == 1000, r["errors"]
    assert r["health_ok"] > 0 and r["health_failed"] == 0


@pytest.mark.parametrize("body, why", [
    (b"[" * 100_000, "nests too deeply"),
    (json.dumps({"queries": ["x"] * 100, "topk": 10**9}).encode(), "topk"),
    (json.dumps({"queries": ["x"] * (server_lib.MAX_QUERIES + 1)}).encode(), "queries"),
    (json.dumps({"queries": ["x"] * 2000, "topk": 100}).encode(), "passages; at most"),
])
def test_oversized_or_nested_requests_get_400(server_url, body, why):
    r = requests.post(f"{server_url}/retrieve", data=body, timeout=30)
    assert r.status_code == 400 and why in r.json()["error"]


def test_an_idle_connection_is_closed(server_url, monkeypatch):
    monkeypatch.setattr(server_lib._RetrievalHandler, "timeout", 0.5)
    host, port = server_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /retrieve HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")  # half sent
        s.settimeout(10)
        assert s.recv(1024) == b""  # the server hung up instead of holding a thread forever


# -- random input ---------------------------------------------------------------------------

_KEYS = ("question", "golden_answers", "answer", "answers", "id", "data_source", "reward_model",
         "ground_truth", "target", "contents", "queries", "topk", "return_scores")


def _random_value(rng, depth=0):
    kind = rng.integers(0, 9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return bool(rng.integers(0, 2))
    if kind == 2:
        return int(rng.integers(-10**12, 10**12))
    if kind == 3:
        return float(rng.choice([rng.normal() * 1e6, np.nan, np.inf, -0.0, 1e308]))
    if kind in (4, 5):
        return "".join(chr(int(c)) for c in rng.integers(1, 0x2FFF, rng.integers(0, 12)))
    if kind == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.integers(0, 4))]
    return {str(rng.choice(_KEYS)) if rng.random() < 0.8 else _random_value(rng, 9) or "k":
            _random_value(rng, depth + 1) for _ in range(rng.integers(0, 5))}


def test_random_bytes_and_json_raise_only_the_documented_errors(tmp_path):
    """>= 10k random lines (raw bytes, random JSON values, deep nesting) through the QA loader,
    the corpus loader and the server's request parser."""
    from zerosearch_jax.search import CorpusFormatError, load_searchr1_jsonl

    rng = np.random.default_rng(0)
    lines = []
    for i in range(12_000):
        if i % 3 == 0:
            lines.append(rng.bytes(int(rng.integers(1, 80))).replace(b"\n", b" "))
        elif i % 997 == 0:
            lines.append(b"[" * 100_000 + b"]" * 100_000)
        else:
            lines.append(json.dumps(_random_value(rng), ensure_ascii=False).encode())
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    for ex in qa.load_jsonl(path, on_error="skip"):
        assert ex.question and all(isinstance(a, str) and a for a in ex.golden_answers)
    with pytest.raises(qa.DataError):
        qa.load_jsonl(path)
    load_searchr1_jsonl(path, on_error="skip")
    with pytest.raises(CorpusFormatError):
        load_searchr1_jsonl(path)
    refused = 0
    for line in lines:
        try:
            server_lib.parse_retrieve_request(line)
        except server_lib.BadRequest:
            refused += 1
    assert refused > len(lines) // 2


# -- secrets ------------------------------------------------------------------------------------


def test_the_serpapi_key_never_reaches_the_logs(caplog):
    SerpAPIClient(topk=2, api_key="sk-live-secret")
    with caplog.at_level(logging.DEBUG, logger="urllib3.connectionpool"):
        logging.getLogger("urllib3.connectionpool").debug(
            '%s://%s:%s "%s %s %s" %s %s', "https", "serpapi.com", 443, "GET",
            "/search?engine=google&q=x&api_key=sk-live-secret", "HTTP/1.1", 200, None)
    assert "api_key=***" in caplog.text and "sk-live-secret" not in caplog.text




_FULL_DISK_COMMAND = """
from zerosearch_jax import checkpoints, cli

def command(config, workdir):
    checkpoints.require_free_space(workdir, 2**62, "a checkpoint")

cli.run_command(command, "default.py", "run directory")
"""


def test_a_full_disk_is_an_error_line_not_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK_COMMAND, f"--workdir={tmp_path}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: [Errno 28] not enough disk space for a checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr
