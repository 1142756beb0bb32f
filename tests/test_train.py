"""The training driver end to end: config errors, a tiny run, SIGKILL + resume, non-finite stop."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.train_utils import tiny_policy_dir, tiny_run_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=600, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "zerosearch_jax.train", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, smollm2_tokenizer):
    return tiny_policy_dir(tmp_path_factory.mktemp("policy"), smollm2_tokenizer)


def test_unknown_config_key_fails_before_work(tmp_path):
    proc = _run(["--config=configs/default.py", f"--workdir={tmp_path}",
                 "--config.rollout.max_turnz=3"], timeout=120)
    assert proc.returncode != 0
    assert "max_turnz" in proc.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.parametrize(("flag", "message"), [
    ("--config.algorithm.estimator=ppo", "unknown advantage_estimator 'ppo'"),
    ("--config.rollout.max_turns=-1", "max_turns must be >= 0, got -1"),
    ("--config.curriculum.end=1.5", "config.curriculum"),
    ("--config.algorithm.pack_length=512", "algorithm.pack_length"),
    ("--config.warmup.pack_length=512", "warmup.pack_length"),
    ("--config.warmup.reread_single_hop=1.5", "warmup.reread_single_hop"),
])
def test_bad_config_value_is_named(tmp_path, flag, message):
    proc = _run(["--config=configs/default.py", f"--workdir={tmp_path}", flag], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr


def _final_params(workdir):
    from safetensors.numpy import load_file

    return load_file(os.path.join(workdir, "hf_policy", "model.safetensors"))


def test_sigkill_resume_matches_uninterrupted_run(policy_dir, tmp_path):
    full = tmp_path / "full"
    proc = _run([*tiny_run_flags(policy_dir, full, steps=4), "--config.train_traces=True"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(full / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert os.path.exists(full / "plots" / "training_curves.png")
    final = json.load(open(full / "final_validation.json"))  # each F1 with its interval
    assert final["f1_lo"] <= final["f1"] <= final["f1_hi"]
    assert any(k.endswith("/f1_hi") for k in final) and any(k.endswith("/searches")
                                                             for k in final)
    # The change over step 0, question by question: its mean is the difference of the means.
    assert abs(final["gain_f1"] - (rows[-1]["val/f1"] - rows[0]["val/f1"])) < 1e-6
    assert final["gain_f1_lo"] <= final["gain_f1"] <= final["gain_f1_hi"]
    # The validations' episodes, one line a question, scored as the metrics say.
    for step in (0, 4):
        traces = [json.loads(line) for line in open(full / "validation" / f"step_{step:06d}.jsonl")]
        assert traces and {"question", "golden_answers", "response", "answer", "f1",
                           "searches"} <= set(traces[0])
        f1 = rows[-1]["val/f1"] if step == 4 else rows[0]["val/f1"]
        assert abs(sum(t["f1"] for t in traces) / len(traces) - f1) < 1e-6
    # With train_traces, each RL step's episodes: the rewards the step's metrics average, the
    # GRPO groups in episode order, each search call's query and coin.
    for row in rows[1:]:
        traces = [json.loads(line) for line in
                  open(full / "train_traces" / f"step_{row['step']:06d}.jsonl")]
        assert abs(np.mean([t["f1"] for t in traces]) - row["reward/f1"]) < 1e-6
        groups = [t["group"] for t in traces]
        assert groups == sorted(groups) and len(set(groups)) < len(groups)
        assert all(len({t["question"] for t in traces if t["group"] == g}) == 1 for g in groups)
        spread = [len({t["f1"] for t in traces if t["group"] == g}) > 1 for g in set(groups)]
        assert abs(np.mean(spread) - row["reward/groups_with_spread"]) < 1e-6
        assert abs(np.mean([len(t["calls"]) for t in traces]) - row["episode/engine_calls"]) < 1e-6
        assert all(c["useful"] in (True, False) for t in traces for c in t["calls"])
        assert {t["noise_probability"] for t in traces} == {row["curriculum/noise_probability"]}

    # Same run, killed with SIGKILL once the step-2 checkpoint exists, then restarted.
    killed = tmp_path / "killed"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.Popen([sys.executable, "-m", "zerosearch_jax.train",
                          *tiny_run_flags(policy_dir, killed, steps=4)], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if glob.glob(str(killed / "checkpoints" / "2" / "*")) and \
                not glob.glob(str(killed / "checkpoints" / "*tmp*")):
            break
        time.sleep(0.2)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not os.path.exists(killed / "hf_policy")
    proc = _run(tiny_run_flags(policy_dir, killed, steps=4))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed" in proc.stderr
    a, b = _final_params(full), _final_params(killed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)
    steps = [json.loads(line)["step"] for line in open(killed / "metrics.jsonl")]
    assert steps == sorted(steps) and steps[-1] == 4 and len(steps) == len(set(steps))


def test_a_corrupt_newest_checkpoint_resumes_from_the_previous_step(policy_dir, tmp_path):
    """Train, overwrite 4 KB of the newest step's largest array file with random bytes, rerun:
    the damaged step is set aside (logged), the run resumes from the step before and ends
    bit-identical to the uninterrupted run."""
    flags = tiny_run_flags(policy_dir, tmp_path, steps=3, **{"checkpoint.every": 1})
    proc = _run(flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    clean = _final_params(tmp_path)
    target = max((p for p in (tmp_path / "checkpoints" / "3").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    start = len(data) // 2
    data[start:start + 4096] = np.random.default_rng(0).integers(0, 256, 4096,
                                                                 dtype=np.uint8).tobytes()
    target.write_bytes(bytes(data))
    proc = _run(flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint step 3 is damaged" in proc.stderr
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
    assert (tmp_path / "checkpoints" / "3.corrupt").exists()
    again = _final_params(tmp_path)
    for k in clean:
        np.testing.assert_array_equal(clean[k], again[k], err_msg=k)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3]


def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once(policy_dir, tmp_path):
    flags = tiny_run_flags(policy_dir, tmp_path, steps=3, **{"checkpoint.every": 3})
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.Popen([sys.executable, "-m", "zerosearch_jax.train", *flags], cwd=ROOT,
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and any(json.loads(line)["step"] == 1
                                    for line in open(metrics) if line.strip()):
            break
        time.sleep(0.2)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not glob.glob(str(tmp_path / "checkpoints" / "[0-9]*"))
    proc = _run(flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in open(metrics)]
    assert steps == [0, 1, 2, 3]


def test_nonfinite_updates_stop_the_run_with_the_last_good_checkpoint(policy_dir, tmp_path):
    proc = _run(tiny_run_flags(policy_dir, tmp_path, steps=8, **{
        "optim.lr": 1e12, "optim.grad_clip": 1e30, "checkpoint.every": 1,
        "max_nonfinite_steps": 2}))
    assert proc.returncode != 0
    assert "consecutive steps had non-finite losses" in proc.stderr
    assert "is intact" in proc.stderr
    assert glob.glob(str(tmp_path / "checkpoints" / "*"))


def test_sigterm_checkpoints_at_the_step_end_and_the_run_resumes(policy_dir, tmp_path):
    # No periodic checkpoint (checkpoint.every=100): the only one is the preemption's.
    flags = tiny_run_flags(policy_dir, tmp_path, steps=6, **{"checkpoint.every": 100})
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "zerosearch_jax.train", *flags], cwd=ROOT,
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and any(json.loads(line)["step"] >= 1
                                    for line in metrics.read_text().splitlines() if line):
            break
        time.sleep(0.1)
    assert p.poll() is None, "the run ended before the signal"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert "preempted: checkpoint saved at step" in err
    saved = sorted(int(os.path.basename(d)) for d in glob.glob(str(tmp_path / "checkpoints" / "*"))
                   if os.path.basename(d).isdigit())
    assert len(saved) == 1 and 1 <= saved[0] < 6
    assert not os.path.exists(tmp_path / "hf_policy")
    proc = _run(flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"at step {saved[0]}" in proc.stderr
    steps = [json.loads(line)["step"] for line in open(metrics)]
    assert steps[-1] == 6 and len(steps) == len(set(steps)) and steps == sorted(steps)


TRAINING_CONFIGS = sorted(
    os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if os.path.basename(p) == "default.py" or os.path.basename(p).startswith("zerosearch_"))


def test_training_configs_are_found():
    assert "default" in TRAINING_CONFIGS and len(TRAINING_CONFIGS) >= 6


@pytest.mark.parametrize("name", TRAINING_CONFIGS)
def test_every_config_file_validates(name):
    import importlib

    from zerosearch_jax import train

    sys.path.insert(0, ROOT)
    config = importlib.import_module(f"configs.{name}").get_config()
    settings = train.build_settings(config)
    assert settings.update.advantage_estimator == config.algorithm.estimator
    if name.startswith("zerosearch_"):  # the paper's settings (docs/method.md §7)
        assert config.total_steps == 203 and config.prompts_per_step == 64
        assert config.rollout.samples_per_prompt == 5 and config.optim.lr == 1e-6
        assert config.simulator.model.startswith("sunhaonlp/SearchSimulation")


def test_the_run_description_names_noise_only_for_a_simulator():
    import importlib

    from zerosearch_jax import train

    sys.path.insert(0, ROOT)
    config = importlib.import_module("configs.default").get_config()
    assert "(noise 0.00 -> 0.50)" in train.describe_run(config, "/tmp/run")
    config.simulator.kind = "bm25"
    text = train.describe_run(config, "/tmp/run")
    assert "against the real engine bm25, validated on 64 questions" in text
    assert "noise" not in text.split("RL:")[1]


def test_trim_response_keeps_every_real_token_and_rounds_up():
    from zerosearch_jax import agent, train
    from zerosearch_jax.agent.environment import Piece

    P, R = 4, 448
    rows = [(3, 10), (4, 130)]  # (prompt, response) lengths
    prompts = [np.arange(1, p + 1, dtype=np.int32) for p, _ in rows]
    pieces = [[Piece(np.full(r, 7, np.int32), True, np.zeros(r, np.float32))]
              for _, r in rows]
    batch = agent.assemble_batch(prompts, pieces, np.array([1.0, 0.5], np.float32),
                                 np.arange(2), pad_id=0, prompt_length=P, response_length=R)
    cut = train.trim_response(batch, R)
    assert cut.tokens.shape == (2, P + 256)  # 130 -> the next multiple of 128
    for name in ("tokens", "attention_mask", "positions", "loss_mask", "logprobs", "rewards"):
        np.testing.assert_array_equal(getattr(cut, name), getattr(batch, name)[:, :P + 256])
    assert cut.attention_mask.sum() == batch.attention_mask.sum()
    assert cut.rewards.sum() == batch.rewards.sum() == 1.5
    # Never longer than the packed batch.
    assert train.trim_response(batch, 200).tokens.shape == (2, P + 200)


def test_compilation_cache_flag_defers_to_the_environment(monkeypatch, tmp_path):
    """`--compilation_cache_dir` points JAX's persistent cache at the directory (`~` expanded);
    '' leaves the setting alone, and so does a JAX_COMPILATION_CACHE_DIR already set."""
    import jax

    from zerosearch_jax.cli import enable_compilation_cache

    before = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path))
        enable_compilation_cache("~/xla")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        enable_compilation_cache("")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
        enable_compilation_cache(str(tmp_path / "flag"))
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
