"""zerosearch_jax.sweep: grids and point names, override validation, summaries, skipping done
points, failures, and one real sweep of tiny training runs."""

import csv
import json
import os
import subprocess
import sys

import pytest

from tests.train_utils import tiny_policy_dir, tiny_run_flags
from zerosearch_jax import sweep
from zerosearch_jax.metrics import MetricsWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "configs", "default.py")


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "zerosearch_jax.sweep", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _sweep_file(tmp_path, points, name="s.py"):
    path = tmp_path / name
    path.write_text(f"def get_sweep():\n    return {points!r}\n")
    return str(path)


# ----------------------------------------------------------------------------------------------
# Grids, names, sweep files
# ----------------------------------------------------------------------------------------------


def test_product_is_the_grid_with_the_first_axis_slowest():
    grid = sweep.product(**{"optim.lr": [1e-6, 3e-6], "algorithm.estimator": ["grpo", "gae"]})
    assert grid == [{"optim.lr": 1e-6, "algorithm.estimator": "grpo"},
                    {"optim.lr": 1e-6, "algorithm.estimator": "gae"},
                    {"optim.lr": 3e-6, "algorithm.estimator": "grpo"},
                    {"optim.lr": 3e-6, "algorithm.estimator": "gae"}]
    points = sweep.make_points(grid)
    assert [p.name for p in points] == ["lr=1e-06,estimator=grpo", "lr=1e-06,estimator=gae",
                                        "lr=3e-06,estimator=grpo", "lr=3e-06,estimator=gae"]
    assert points[1].flags == ("--config.optim.lr=1e-06", "--config.algorithm.estimator=gae")


@pytest.mark.parametrize("axes", [{"optim.lr": []}, {"data.train": "a.jsonl"},
                                  {"optim.lr": 1e-6}])
def test_product_rejects_axes_that_are_not_lists(axes):
    with pytest.raises(sweep.SweepError, match="must be a non-empty list"):
        sweep.product(**axes)


def test_point_names():
    points = sweep.make_points([
        {"rollout.temperature": 1.0, "simulator.temperature": 0.5},  # same last component
        {"data.train": "/data/nq train.jsonl", "mesh.shape": (1, -1, 1)},
        {"data.train": "a/b"}, {"data.train": "a:b"},  # the same once made path-safe
        {},
        {"data.train": "x" * 300},
    ])
    names = [p.name for p in points]
    assert names[0] == "rollout.temperature=1.0,simulator.temperature=0.5"
    assert names[1] == "train=data-nqtrain.jsonl,shape=1_-1_1"
    assert points[1].flags == ("--config.data.train=/data/nq train.jsonl",
                               "--config.mesh.shape=(1, -1, 1)")
    assert names[2].startswith("train=a-b-") and names[3].startswith("train=a-b-")
    assert names[2] != names[3]
    assert names[4] == "base"
    assert len(names[5]) == sweep._MAX_NAME and names[5].startswith("train=xxx")
    assert len(set(names)) == len(names)
    # A name depends on the point only, not on its position in the list.
    assert sweep.make_points([{"data.train": "a/b"}])[0].name == "train=a-b"
    with pytest.raises(sweep.SweepError, match="point 2 repeats point 0"):
        sweep.make_points([{"optim.lr": 1.0}, {"optim.lr": 2.0}, {"optim.lr": 1.0}])


@pytest.mark.parametrize(("body", "message"), [
    ("x = 1\n", "must define get_sweep()"),
    ("def get_sweep():\n    return []\n", "non-empty list"),
    ("def get_sweep():\n    return [1]\n", "point 0 must be a dict"),
    ("def get_sweep():\n    return [{'--config.optim.lr': 1}]\n", "must be a dotted config path"),
    ("def get_sweep():\n    return [{'optim': {'lr': 1}}]\n", "'optim.<field>'"),
])
def test_bad_sweep_files(tmp_path, body, message):
    path = tmp_path / "bad.py"
    path.write_text(body)
    with pytest.raises(sweep.SweepError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sweep.load_sweep(str(path))


def test_example_sweep_file_validates_against_the_default_config():
    points = sweep.make_points(sweep.load_sweep(
        os.path.join(ROOT, "configs", "sweeps", "default_lr_estimator.py")))
    assert [p.name for p in points] == ["lr=1e-06,estimator=grpo", "lr=1e-06,estimator=reinforce",
                                        "lr=2e-05,estimator=grpo", "lr=2e-05,estimator=reinforce"]
    sweep.validate(DEFAULT, points, [])


def _shared_stage_sweep(name):
    """The points of configs/sweeps/<name>, validated with the shared-stage flags their
    commands use (docs/science.md)."""
    points = sweep.make_points(sweep.load_sweep(os.path.join(ROOT, "configs", "sweeps", name)))
    extra = ["--config.stages_dir=runs/default", "--config.validation.before_rl=False"]
    sweep.check_extra_flags(extra, points)
    sweep.validate(DEFAULT, points, extra)
    return points


def test_the_ablation_sweep_validates_and_changes_one_thing_a_row():
    """configs/sweeps/ablations.py: every row valid with the shared-stage flags of its command
    (docs/science.md), each row one change from the default, seed 0's rows first."""
    points = _shared_stage_sweep("ablations.py")
    assert len(points) == 16 and points[0].name == "seed=0" and points[8].name == "seed=1"
    assert [p.overrides["seed"] for p in points] == [0] * 8 + [1] * 8


def test_the_learning_rate_sweep_validates_with_its_shared_stage_flags():
    points = _shared_stage_sweep("learning_rate.py")
    assert [p.name for p in points] == ["lr=1e-05,seed=0", "lr=1e-05,seed=1"]


def test_the_rl_budget_sweep_validates_with_its_shared_stage_flags():
    points = _shared_stage_sweep("rl_budget.py")
    assert [p.overrides["seed"] for p in points] == [0, 1]
    assert all(p.overrides["prompts_per_step"] * p.overrides["total_steps"] == 96
               for p in points)


def test_the_noise_levels_sweep_validates_with_its_shared_stage_flags():
    points = _shared_stage_sweep("noise_levels.py")
    assert [p.name for p in points] == ["start=0.25,end=0.75,seed=0", "schedule=constant,seed=0"]


def test_the_repeated_queries_sweep_validates_with_its_shared_stage_flags():
    points = _shared_stage_sweep("repeated_queries.py")
    assert [p.overrides["seed"] for p in points] == [0] * 4 + [1] * 4
    assert [p.overrides.get("rollout.reuse_repeated_queries", False)
            for p in points[:4]] == [False, True, False, True]


def test_the_warmup_plans_sweep_validates_with_a_shared_simulator():
    """configs/sweeps/warmup_plans.py: each point runs its own warm-up and shares only the
    tuned simulator (the flags of its command)."""
    points = sweep.make_points(sweep.load_sweep(
        os.path.join(ROOT, "configs", "sweeps", "warmup_plans.py")))
    extra = ["--config.simulator.tune=False",
             "--config.simulator.model=runs/default/simulator_sft/hf"]
    sweep.check_extra_flags(extra, points)
    sweep.validate(DEFAULT, points, extra)
    assert [p.overrides["seed"] for p in points] == [0] * 3 + [1] * 3
    assert [p.overrides.get("warmup.reread_single_hop", 0.0) for p in points[:3]] == [0, 0, 0.5]
    assert all(p.overrides.get("warmup.stratify", False) for p in points[1:3])


# ----------------------------------------------------------------------------------------------
# Validation: before anything is launched
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "extra", "message"), [
    ({"optim.lrr": 1e-6}, [], "point 'lrr=1e-06': unknown config key 'optim.lrr'; optim has "
                              "b1, b2, critic_lr"),
    ({"optimizer.lr": 1e-6}, [], "unknown config key 'optimizer.lr'; the config has"),
    ({"optim.lr": "fast"}, [], "--config.optim.lr=fast: could not convert string to float"),
    ({"total_steps": 2.5}, [], "--config.total_steps=2.5"),
    ({"algorithm.estimator": "ppo"}, [], "unknown advantage_estimator 'ppo'"),
    ({"rollout.max_turns": -1}, [], "max_turns must be >= 0, got -1"),
    ({"optim.lr": 1e-6}, ["--config.rollout.max_turnz=2"],
     "extra override --config.rollout.max_turnz=2: unknown config key 'rollout.max_turnz'"),
    ({"optim.lr": 1e-6}, ["--config.algorithm.pack_length=512"], "algorithm.pack_length"),
])
def test_validation_names_the_point_and_the_key(overrides, extra, message):
    points = sweep.make_points([{"optim.lr": 5e-6}, overrides])
    with pytest.raises(sweep.SweepError) as e:
        sweep.validate(DEFAULT, points, extra)
    assert message in str(e.value)


@pytest.mark.parametrize(("extra", "message"), [
    (["--config.optim.lr=1"], "sets 'optim.lr', which the sweep varies"),
    (["--total_steps=2"], "expected --config.<key>=<value>"),
])
def test_extra_overrides_are_checked(extra, message):
    with pytest.raises(sweep.SweepError, match=message):
        sweep.check_extra_flags(extra, sweep.make_points([{"optim.lr": 1e-6}]))


def test_cli_rejects_an_unknown_key_before_launching_anything(tmp_path):
    path = _sweep_file(tmp_path, [{"optim.lr": 1e-6}, {"optim.lrr": 1e-6}])
    proc = _cli(f"--config={DEFAULT}", f"--sweep={path}", f"--workdir={tmp_path / 'root'}",
                "--config.total_steps=2")
    assert proc.returncode == 2
    assert "unknown config key 'optim.lrr'" in proc.stderr
    assert not (tmp_path / "root").exists()


def test_cli_dry_run_prints_the_commands_and_writes_nothing(tmp_path):
    path = _sweep_file(tmp_path, [{"optim.lr": 1e-6}, {"optim.lr": 2e-6}])
    root = tmp_path / "root"
    proc = _cli(f"--config={DEFAULT}", f"--sweep={path}", f"--workdir={root}", "--dry-run",
                "--", "--config.data.train=synthetic:train")
    assert proc.returncode == 0, proc.stderr
    runs = [line for line in proc.stdout.splitlines() if line.startswith("run  ")]
    assert runs[0] == (f"run  lr=1e-06: {sys.executable} -m zerosearch_jax.train "
                       f"--config={DEFAULT} --config.optim.lr=1e-06 "
                       f"--config.data.train=synthetic:train --workdir={root}/lr=1e-06")
    assert len(runs) == 2 and not root.exists()
    proc = _cli(f"--config={DEFAULT}", f"--sweep={path}", f"--workdir={root}", "--dry-run",
                "--only=lr=2e-06")
    assert proc.returncode == 0, proc.stderr
    assert "2 point(s) valid" in proc.stdout and "running 1 (--only)" in proc.stdout
    assert [line.split(":")[0] for line in proc.stdout.splitlines()
            if line.startswith("run  ")] == ["run  lr=2e-06"]


# ----------------------------------------------------------------------------------------------
# Summaries, skipping, failures (hand-made point directories)
# ----------------------------------------------------------------------------------------------


def _plan(root, points, extra=()):
    root.mkdir(parents=True, exist_ok=True)
    (root / sweep.PLAN_FILE).write_text(json.dumps({
        "config": DEFAULT, "sweep": "s.py", "extra_overrides": list(extra),
        "points": [{"name": p.name, "overrides": p.overrides} for p in points]}))


def _fake_run(pdir, steps, rewards, final=None, returncode=None, total_steps=4, command=None):
    """A point directory as train.py and the sweep leave it."""
    pdir.mkdir(parents=True)
    (pdir / "config.json").write_text(json.dumps({"total_steps": total_steps}))
    with MetricsWriter(pdir, tensorboard=False) as writer:
        writer.write(0, {"f1": 0.05}, prefix="val/")
        for step, reward in zip(steps, rewards, strict=True):
            writer.write(step, {"reward/f1": reward, "train/loss": 0.1})
    if final is not None:
        (pdir / sweep.FINAL_FILE).write_text(json.dumps(final))
    record = {"name": pdir.name, "command": command or []}
    if returncode is not None:
        record["returncode"] = returncode
    (pdir / sweep.POINT_FILE).write_text(json.dumps(record))


def test_summary_from_point_directories(tmp_path):
    root = tmp_path / "root"
    points = sweep.make_points(sweep.product(**{"optim.lr": [1e-6, 2e-6],
                                                "algorithm.estimator": ["grpo", "gae"]}))
    _plan(root, points)
    final = {"f1": 0.4, "em": 0.25, "cover_em": 0.3, "searches": 1.5, "nq/f1": 0.5,
             "nq/cover_em": 0.35}
    # A NaN reward is logged as null; the summary takes the last real value.
    _fake_run(root / points[0].name, [1, 2, 3, 4], [0.1, 0.2, 0.3, float("nan")], final=final)
    _fake_run(root / points[1].name, [1, 2], [0.1, 0.15], returncode=1)
    _fake_run(root / points[2].name, [1], [0.05])  # interrupted (or still running)
    rows = sweep.summarize(root)
    assert [r["status"] for r in rows] == ["done", "failed (exit 1)", "incomplete", "pending"]
    assert rows[0]["optim.lr"] == "1e-06" and rows[0]["algorithm.estimator"] == "grpo"
    assert rows[0]["steps"] == 4 and rows[0]["total_steps"] == 4
    assert rows[0]["last reward/f1"] == 0.3
    assert rows[0]["val/f1"] == 0.4 and rows[0]["val/nq/cover_em"] == 0.35
    assert rows[1]["steps"] == 2 and "val/f1" not in rows[1]
    assert set(rows[3]) == {"point", "status", "optim.lr", "algorithm.estimator"}

    table = sweep.write_summary(root, rows)
    with open(root / sweep.SUMMARY_CSV) as f:
        csv_rows = list(csv.DictReader(f))
    assert list(csv_rows[0])[:4] == ["point", "status", "optim.lr", "algorithm.estimator"]
    assert "val/nq/f1" in csv_rows[0] and csv_rows[0]["val/nq/f1"] == "0.5"
    assert csv_rows[1]["status"] == "failed (exit 1)" and csv_rows[1]["val/f1"] == ""
    assert csv_rows[3]["steps"] == ""
    header = table.splitlines()[0]
    assert header == ("| point | status | optim.lr | algorithm.estimator | steps | total_steps "
                      "| last reward/f1 | val/cover_em | val/em | val/f1 | val/searches |")
    assert "| lr=1e-06,estimator=grpo | done | 1e-06 | grpo | 4 | 4 | 0.3 | 0.3 | 0.25 | 0.4 " \
           "| 1.5 |" in table
    md = (root / sweep.SUMMARY_MD).read_text()
    assert table in md and "1 done, 1 failed, 1 incomplete, 1 pending" in md

    # --summarize rebuilds the same files from the directories alone.
    os.remove(root / sweep.SUMMARY_CSV)
    proc = _cli("--summarize", f"--workdir={root}", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert table in proc.stdout
    with open(root / sweep.SUMMARY_CSV) as f:
        assert list(csv.DictReader(f)) == csv_rows


def test_summarize_needs_a_sweep_directory(tmp_path):
    with pytest.raises(sweep.SweepError, match="no sweep.json"):
        sweep.summarize(tmp_path)


def test_done_points_are_skipped(tmp_path):
    root = tmp_path / "root"
    points = sweep.make_points([{"optim.lr": 1e-6}, {"optim.lr": 2e-6}])
    for p in points:
        command = sweep.train_command(DEFAULT, p, [], root / p.name, python="/no/such/python")
        _fake_run(root / p.name, [1], [0.2], final={"f1": 0.1}, returncode=0, command=command)
    # A launch would fail: this python does not exist.
    status = sweep.run_sweep(DEFAULT, points, [], root, python="/no/such/python", poll_s=0.01)
    assert status == {"lr=1e-06": "skipped", "lr=2e-06": "skipped"}
    assert not (root / "lr=1e-06" / sweep.LOG_FILE).exists()


def test_only_runs_the_selected_points_and_keeps_the_rest_pending(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\n"
                    "for a in \"$@\"; do case $a in --workdir=*) w=${a#--workdir=};; esac; done\n"
                    "echo '{\"f1\": 0.5}' > \"$w/final_validation.json\"\n")
    fake.chmod(0o755)
    rows = [{"algorithm.estimator": e, "seed": s} for s in (0, 1) for e in ("grpo", "reinforce")]
    points = sweep.make_points(rows)
    # The short key, as point names spell it, or the whole one; values as the command line.
    assert sweep.select_points(points, ["seed=0"]) == ["estimator=grpo,seed=0",
                                                        "estimator=reinforce,seed=0"]
    assert sweep.select_points(points, ["algorithm.estimator=reinforce", "seed=1"]) == [
        "estimator=reinforce,seed=1"]
    root = tmp_path / "root"
    only = sweep.select_points(points, ["seed=0"])
    status = sweep.run_sweep(DEFAULT, points, [], root, python=str(fake), poll_s=0.01, only=only)
    assert status == {"estimator=grpo,seed=0": "done", "estimator=reinforce,seed=0": "done"}
    assert [r["status"] for r in sweep.summarize(root)] == ["done", "done", "pending", "pending"]
    # The same sweep without the filter runs what is left and skips what is done.
    status = sweep.run_sweep(DEFAULT, points, [], root, python=str(fake), poll_s=0.01)
    assert status == {"estimator=grpo,seed=0": "skipped", "estimator=reinforce,seed=0": "skipped",
                      "estimator=grpo,seed=1": "done", "estimator=reinforce,seed=1": "done"}


@pytest.mark.parametrize("only, message", [
    (["seed"], "expected <key>=<value>"),
    (["optim.lr=1e-6"], "'optim.lr' is not a key this sweep varies .swept: algorithm.estimator"),
    (["seed=7"], "selects no point"),
])
def test_only_names_what_it_cannot_select(only, message):
    points = sweep.make_points([{"algorithm.estimator": "grpo", "seed": s} for s in (0, 1)])
    with pytest.raises(sweep.SweepError, match=message):
        sweep.select_points(points, only)


def test_a_point_started_with_another_command_is_not_resumed(tmp_path):
    root = tmp_path / "root"
    [point] = sweep.make_points([{"optim.lr": 1e-6}])
    command = sweep.train_command(DEFAULT, point, ["--config.total_steps=3"], root / point.name)
    _fake_run(root / point.name, [1], [0.2], command=command)
    with pytest.raises(sweep.SweepError, match="was started with a different command"):
        sweep.run_sweep(DEFAULT, [point], ["--config.total_steps=4"], root)


def test_a_failing_point_does_not_stop_the_others(tmp_path, capsys):
    # A stand-in interpreter: fails for one point, writes final_validation.json for the others.
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\n"
                    "for a in \"$@\"; do case $a in --workdir=*) w=${a#--workdir=};; esac; done\n"
                    "case \"$*\" in *optim.lr=2e-06*) echo 'boom: bad point' >&2; exit 3;; esac\n"
                    "echo '{\"f1\": 0.5}' > \"$w/final_validation.json\"\n")
    fake.chmod(0o755)
    points = sweep.make_points([{"optim.lr": 1e-6}, {"optim.lr": 2e-6}, {"optim.lr": 3e-6}])
    root = tmp_path / "root"
    status = sweep.run_sweep(DEFAULT, points, [], root, python=str(fake), poll_s=0.01)
    assert status == {"lr=1e-06": "done", "lr=2e-06": "failed (exit 3)", "lr=3e-06": "done"}
    assert "boom: bad point" in capsys.readouterr().out  # the log's tail is reported
    assert [r["status"] for r in sweep.summarize(root)] == ["done", "failed (exit 3)", "done"]


# ----------------------------------------------------------------------------------------------
# A real sweep: two tiny training runs, side by side
# ----------------------------------------------------------------------------------------------


def test_end_to_end_sweep_of_tiny_runs(tmp_path, smollm2_tokenizer):
    policy = tiny_policy_dir(tmp_path, smollm2_tokenizer)
    tiny = [f for f in tiny_run_flags(policy, "unused", steps=1, **{
        "export_hf": False, "data.validation_size": 1}) if f.startswith("--config.")]
    swept = {"policy", "optim.lr"}
    extra = [f for f in tiny if f.split("=", 1)[0][len("--config."):] not in swept]
    path = _sweep_file(tmp_path, [{"policy": policy, "optim.lr": 1e-3},
                                  {"policy": policy, "optim.lr": 1e-2}])
    root = tmp_path / "root"
    proc = _cli(f"--config={DEFAULT}", f"--sweep={path}", f"--workdir={root}",
                "--max_parallel=2", "--", *extra, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = sweep.summarize(root)
    assert [r["status"] for r in rows] == ["done", "done"]
    for row in rows:
        final = json.loads((root / row["point"] / sweep.FINAL_FILE).read_text())
        assert row["val/f1"] == final["f1"] and 0.0 <= final["f1"] <= 1.0
        assert row["steps"] == 1 and row["total_steps"] == 1
        assert row["last reward/f1"] is not None
        config = json.loads((root / row["point"] / "config.json").read_text())
        assert config["optim"]["lr"] == float(row["optim.lr"])
        assert config["total_steps"] == 1 and config["policy"] == policy
        assert "validation before training" in (root / row["point"] / sweep.LOG_FILE).read_text()
    with open(root / sweep.SUMMARY_CSV) as f:
        assert [r["point"] for r in csv.DictReader(f)] == [r["point"] for r in rows]
    assert sweep.markdown_table(rows) in proc.stdout


def test_finished_points_drop_their_checkpoints_when_asked(tmp_path, capsys):
    # A stand-in interpreter writing a checkpoint; it fails for one point, whose checkpoint
    # must stay (a re-run resumes from it).
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\n"
                    "for a in \"$@\"; do case $a in --workdir=*) w=${a#--workdir=};; esac; done\n"
                    "mkdir -p \"$w/checkpoints/3\"\n"
                    "head -c 4096 /dev/zero > \"$w/checkpoints/3/x\"\n"
                    "case \"$*\" in *optim.lr=2e-06*) exit 3;; esac\n"
                    "echo '{\"f1\": 0.5}' > \"$w/final_validation.json\"\n")
    fake.chmod(0o755)
    points = sweep.make_points([{"optim.lr": 1e-6}, {"optim.lr": 2e-6}])
    kept, dropped = tmp_path / "kept", tmp_path / "dropped"
    sweep.run_sweep(DEFAULT, points, [], kept, python=str(fake), poll_s=0.01)
    status = sweep.run_sweep(DEFAULT, points, [], dropped, python=str(fake), poll_s=0.01,
                             keep_checkpoints=False)
    assert status == {"lr=1e-06": "done", "lr=2e-06": "failed (exit 3)"}
    assert (kept / "lr=1e-06" / "checkpoints" / "3" / "x").exists()
    assert not (dropped / "lr=1e-06" / "checkpoints").exists()
    assert (dropped / "lr=1e-06" / sweep.FINAL_FILE).exists()
    assert (dropped / "lr=2e-06" / "checkpoints" / "3" / "x").exists()
    assert "lr=1e-06: removed checkpoints/" in capsys.readouterr().out
