"""Multi-host training with `jax.distributed`: two processes on localhost (CPU, gloo) against
one process with the same two devices.

Each of the two processes rolls out its own half of every step's questions; their rows become
one global batch for scoring and the update, metrics are gathered, process 0 writes the logs
and the exported policy, and both write the orbax checkpoint. Rollouts sample with per-row keys
and train against BM25 (deterministic), so the two runs must end with the same parameters.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.train_utils import tiny_policy_dir, tiny_run_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300
# Two mini-batches per step: a batch whose rows were assembled in a different order than the
# single-process run's would give different mini-batches, hence different parameters.
OVERRIDES = {"simulator.kind": "bm25", "algorithm.num_minibatches": 2, "checkpoint.every": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, devices: int) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.Popen([sys.executable, "-m", "zerosearch_jax.train", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: dict[str, subprocess.Popen]) -> dict[str, str]:
    """Waits for every process (killing all on a timeout); fails with the stderr of any that
    did not exit cleanly. Returns each one's stdout."""
    out, failed = {}, []
    for name, p in procs.items():
        try:
            stdout, stderr = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            stdout, stderr = p.communicate()
            failed.append(f"{name} timed out after {TIMEOUT} s:\n{stderr[-3000:]}")
            continue
        out[name] = stdout
        if p.returncode != 0:
            failed.append(f"{name} exited with {p.returncode}:\n{stderr[-3000:]}")
    assert not failed, "\n\n".join(failed)
    return out


def _final_validation(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])["final_validation"]


def _restore(workdir):
    """(step, meta, state leaves) of the latest checkpoint, read onto this process's CPU."""
    import jax
    import orbax.checkpoint as ocp

    root = workdir / "checkpoints"
    step = max(int(p.name) for p in root.iterdir() if p.name.isdigit())
    checkpointer = ocp.StandardCheckpointer()
    shapes = checkpointer.metadata(root / str(step) / "state").item_metadata
    cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu),
                            shapes)
    state = checkpointer.restore(root / str(step) / "state", abstract)
    meta = json.loads((root / str(step) / "meta" / "metadata").read_text())
    return step, meta, jax.tree.leaves(state)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, smollm2_tokenizer):
    return tiny_policy_dir(tmp_path_factory.mktemp("policy"), smollm2_tokenizer)


def test_two_processes_match_one_process(policy_dir, tmp_path):
    from safetensors.numpy import load_file

    multi, single = tmp_path / "multi", tmp_path / "single"
    address = f"127.0.0.1:{_free_port()}"
    # All three at once: the two halves of the cluster must run together anyway.
    procs = {f"process {i}": _start(
        [*tiny_run_flags(policy_dir, multi, steps=2, **OVERRIDES),
         f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"], 1)
        for i in range(2)}
    procs["single"] = _start(tiny_run_flags(policy_dir, single, steps=2, **OVERRIDES), 2)
    out = _finish(procs)

    # Every host ends with the same numbers; only process 0 wrote the run's files.
    assert _final_validation(out["process 0"]) == _final_validation(out["process 1"])
    assert _final_validation(out["process 0"]) == _final_validation(out["single"])
    assert len(list(multi.glob("metrics.jsonl"))) == 1 and (multi / "hf_policy").is_dir()

    a = load_file(str(multi / "hf_policy" / "model.safetensors"))
    b = load_file(str(single / "hf_policy" / "model.safetensors"))
    start = load_file(os.path.join(policy_dir, "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)
    assert max(np.abs(a[k] - start[k]).max() for k in a) > 1e-4  # training moved the policy

    rows_a = [json.loads(line) for line in open(multi / "metrics.jsonl")]
    rows_b = [json.loads(line) for line in open(single / "metrics.jsonl")]
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [0, 1, 2]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        keys = {k for k in ra if not k.startswith(("time", "throughput"))}
        assert keys == {k for k in rb if not k.startswith(("time", "throughput"))}
        for k in keys:
            np.testing.assert_allclose(ra[k], rb[k], rtol=1e-5, atol=1e-6, err_msg=k)

    # Each process wrote its own questions' validation episodes; together they are the single
    # process's.
    def episodes(paths):
        return sorted((t["id"], t["f1"], t["response"]) for p in paths
                      for t in map(json.loads, open(p)))
    for step in ("000000", "000002"):
        parts = sorted(multi.glob(f"validation/step_{step}.p*.jsonl"))
        assert [p.name for p in parts] == [f"step_{step}.p0.jsonl", f"step_{step}.p1.jsonl"]
        assert episodes(parts) == episodes([single / "validation" / f"step_{step}.jsonl"])

    # The checkpoint both processes wrote is one checkpoint, equal to the single process's.
    (step_a, meta_a, state_a), (step_b, meta_b, state_b) = _restore(multi), _restore(single)
    assert step_a == step_b == 2 and meta_a == meta_b
    assert len(state_a) == len(state_b)
    for x, y in zip(state_a, state_b, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)
