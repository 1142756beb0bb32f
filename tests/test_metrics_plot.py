"""MetricsWriter / read_metrics (JSONL + TensorBoard, resume truncation) and the plot CLI."""

import json
import logging
import struct

import numpy as np
import pytest

from zerosearch_jax import plot
from zerosearch_jax.metrics import (
    METRICS_FILE,
    TENSORBOARD_DIR,
    MetricsWriter,
    bootstrap_interval,
    groups_with_spread,
    paired_gain,
    read_metrics,
    summary,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_steps(workdir, steps, **kwargs):
    with MetricsWriter(workdir, **kwargs) as writer:
        for step in steps:
            writer.write(step, {"reward/f1": step / 10})


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def test_write_read_round_trip(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(1, {"reward/f1": 0.5, "train/loss": np.float32(2.0), "n": 3})
        writer.write(1, {"f1": 0.25, "em": float("nan")}, prefix="val")
        writer.write(np.int64(2), {"f1": float("inf"), "nq/f1": np.float64(0.125)}, prefix="val/")

    rows = read_metrics(tmp_path)
    assert [row["step"] for row in rows] == [1, 1, 2]
    assert all(isinstance(row["time"], float) for row in rows)
    assert {k: v for k, v in rows[0].items() if k != "time"} == {
        "step": 1, "reward/f1": 0.5, "train/loss": 2.0, "n": 3.0,
    }
    assert {k: v for k, v in rows[1].items() if k != "time"} == {
        "step": 1, "val/f1": 0.25, "val/em": None,
    }
    assert rows[2]["val/f1"] is None and rows[2]["val/nq/f1"] == 0.125
    # Non-finite values are JSON null, so the file is strict JSON (no NaN / Infinity tokens).
    text = (tmp_path / METRICS_FILE).read_text()
    assert "NaN" not in text and "Infinity" not in text
    for line in text.splitlines():
        json.loads(line, parse_constant=pytest.fail)
    # A file path reads the same as its workdir.
    assert read_metrics(tmp_path / METRICS_FILE) == rows


def test_jax_scalars_are_converted(tmp_path):
    import jax.numpy as jnp

    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(jnp.int32(3), {"train/kl_loss": jnp.float32(0.5), "bad": jnp.nan})
    (row,) = read_metrics(tmp_path)
    assert row["step"] == 3 and row["train/kl_loss"] == 0.5 and row["bad"] is None


def test_bad_values_raise_naming_the_key(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(TypeError, match="'val/f1'"):
            writer.write(1, {"f1": "high"}, prefix="val")
        with pytest.raises(TypeError, match="'x'"):
            writer.write(1, {"x": np.ones(3)})
        with pytest.raises(ValueError, match="reserved"):
            writer.write(1, {"step": 1.0})
    with pytest.raises(ValueError, match="closed"):
        writer.write(2, {"x": 1.0})


def test_truncated_last_line_is_skipped(tmp_path, caplog):
    _write_steps(tmp_path, range(5), tensorboard=False)
    path = tmp_path / METRICS_FILE
    path.write_bytes(path.read_bytes() + b'{"step": 5, "reward/f1": 0.')  # killed mid-write

    with caplog.at_level(logging.WARNING, logger="zerosearch_jax.metrics"):
        rows = read_metrics(tmp_path)
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4]
    assert [row["reward/f1"] for row in rows] == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert f"{path}:6" in caplog.text

    # A writer reopened on that file starts a fresh line, so its first row is not lost.
    _write_steps(tmp_path, [5], tensorboard=False)
    assert [row["step"] for row in read_metrics(tmp_path)] == [0, 1, 2, 3, 4, 5]


def test_truncate_after_keeps_rows_up_to_step(tmp_path):
    _write_steps(tmp_path, range(10), tensorboard=False)
    path = tmp_path / METRICS_FILE
    path.write_bytes(path.read_bytes() + b'{"step": 10, "rew')  # the killed attempt's last line

    with MetricsWriter(tmp_path, tensorboard=False) as writer:  # resumed from checkpoint 6
        writer.truncate_after(6)
        assert [row["step"] for row in read_metrics(tmp_path)] == list(range(7))
        writer.write(7, {"reward/f1": 7.0})  # still appends to the rewritten file
    rows = read_metrics(tmp_path)
    assert [row["step"] for row in rows] == list(range(8))
    assert rows[-1]["reward/f1"] == 7.0 and rows[6]["reward/f1"] == 0.6
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]  # no temp file left


def _tensorboard_scalars(logdir):
    """{tag: [(step, value)]} as TensorBoard shows it, read without the tensorboard package.

    Event files are TFRecords (u64 length, u32 crc, payload, u32 crc) of `Event` protos, read in
    name order like TensorBoard does; a `SessionLog.START` at step s hides every earlier event
    with step >= s (TensorBoard's purge of a restarted run's orphaned steps).
    """
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            if event.session_log.status == event_pb2.SessionLog.START:
                for tag, points in scalars.items():
                    scalars[tag] = [(s, v) for s, v in points if s < event.step]
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_event_file(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(1, {"reward/f1": 0.5, "train/loss": float("nan")})
        writer.write(2, {"f1": 0.75}, prefix="val")
    events = list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    scalars = _tensorboard_scalars(tmp_path / TENSORBOARD_DIR)
    assert scalars == {"reward/f1": [(1, 0.5)], "val/f1": [(2, 0.75)]}  # NaN left out


def test_truncate_after_purges_tensorboard_events(tmp_path):
    _write_steps(tmp_path, range(6))
    with MetricsWriter(tmp_path) as writer:
        writer.truncate_after(3)
        writer.write(4, {"reward/f1": 4.0})
    scalars = _tensorboard_scalars(tmp_path / TENSORBOARD_DIR)
    steps, values = zip(*scalars["reward/f1"], strict=True)
    assert steps == (0, 1, 2, 3, 4)  # steps 4 and 5 of the killed attempt are hidden
    assert values == pytest.approx([0.0, 0.1, 0.2, 0.3, 4.0])


def test_disabled_writer_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    with MetricsWriter(workdir, enabled=False) as writer:
        writer.write(1, {"reward/f1": 0.5})
        writer.truncate_after(0)
    assert not workdir.exists()


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------


def _synthetic_run(workdir, steps=60):
    """A run logging every group except throughput, with a NaN-only key and a val every 10."""
    rng = np.random.default_rng(0)
    with MetricsWriter(workdir, tensorboard=False) as writer:
        for step in range(steps):
            t = step / steps
            writer.write(step, {
                "reward/f1": t + 0.1 * rng.normal(),
                "reward/em": 0.8 * t + 0.1 * rng.normal(),
                "curriculum/noise_probability": 0.5 * t,
                "episode/searches": 1 + t,
                "episode/answered": min(1.0, 0.5 + t),
                "episode/response_tokens": 200 + 100 * rng.normal(),
                "train/kl_loss": 1e-3 * t,
                "train/grad_norm": 5 + rng.normal(),
                "train/vf_loss": float("nan"),  # never finite: no panel
            })
            if step % 10 == 0:
                writer.write(step, {"f1": t, "nq/f1": t / 2, "cover_em": t}, prefix="val")


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_questions():
    rng = np.random.default_rng(0)
    small, large = rng.random(16), rng.random(256)
    lo, hi = bootstrap_interval(small)
    assert lo < small.mean() < hi
    lo2, hi2 = bootstrap_interval(large)
    assert lo2 < large.mean() < hi2 and (hi2 - lo2) < (hi - lo) / 2
    # Binary scores: the interval of 32 of 64 right is about 0.5 +- 1.96 * sqrt(.25 / 64).
    lo3, hi3 = bootstrap_interval(np.r_[np.ones(32), np.zeros(32)])
    assert abs(lo3 - 0.377) < 0.03 and abs(hi3 - 0.623) < 0.03
    assert bootstrap_interval(np.ones(8)) == (1.0, 1.0)
    assert all(np.isnan(bootstrap_interval([])))
    assert summary({"f1": 0.5, "f1_lo": 0.375, "f1_hi": 0.625, "em": 0.25, "nq/f1": 0.1}) == \
        "f1=0.500 [0.38, 0.62], em=0.250"


def test_paired_gain_interval_is_the_change_not_the_two_levels():
    rng = np.random.default_rng(0)
    before = (rng.random(64) < 0.5).astype(float)
    # Three questions gained, one lost, the rest unchanged.
    after = before.copy()
    after[np.flatnonzero(before == 0)[:3]] = 1.0
    after[np.flatnonzero(before == 1)[0]] = 0.0
    gain, lo, hi = paired_gain(before, after)
    assert abs(gain - 2 / 64) < 1e-12 and lo <= gain <= hi
    # Separate intervals around the two means are about 0.25 wide; the paired one is narrow.
    b_lo, b_hi = bootstrap_interval(before)
    assert (hi - lo) < (b_hi - b_lo) / 2
    assert paired_gain(before, before) == (0.0, 0.0, 0.0)
    assert all(np.isnan(paired_gain([], [])))
    with pytest.raises(ValueError, match="one shape"):
        paired_gain([1.0, 0.0], [1.0])


def _episodes(path, f1s, sources, extra="", first=0):
    with open(path, "w") as f:
        for i, (v, src) in enumerate(zip(f1s, sources, strict=True), start=first):
            f.write(json.dumps({"id": str(i), "question": f"q{i}", "data_source": src,
                                "f1": v}) + "\n")
        f.write(extra)


def test_gain_over_pairs_the_questions_of_two_validations(tmp_path, caplog):
    from zerosearch_jax import hooks

    sources = ["single", "multi"] * 4
    start, end = tmp_path / "step_000000.jsonl", tmp_path / "step_000006.jsonl"
    _episodes(start, [1, 0, 1, 0, 0, 0, 1, 1], sources, extra="not json\n")
    # Written by two processes: process 1's questions in a `.p1` file beside process 0's.
    _episodes(tmp_path / "step_000006.p0.jsonl", [1, 1, 1, 1], sources[:4])
    _episodes(tmp_path / "step_000006.p1.jsonl", [0, 1, 1, 1], sources[4:], first=4)
    with caplog.at_level(logging.WARNING):
        gain = hooks.gain_over(str(start), str(end), 8)
    assert "malformed" in caplog.text  # the bad line is skipped, named
    assert gain["gain_f1"] == 3 / 8  # q1, q3, q5 gained
    assert gain["multi/gain_f1"] == 3 / 4 and gain["single/gain_f1"] == 0.0
    assert gain["gain_f1_lo"] <= 3 / 8 <= gain["gain_f1_hi"]
    # Missing episodes, or other questions, give no gain rather than a wrong one.
    assert hooks.gain_over(str(tmp_path / "none.jsonl"), str(end), 8) == {}
    assert hooks.gain_over(str(start), str(end), 16) == {}
    _episodes(start, [1, 0, 1, 0, 0, 0, 1], sources[:7])
    assert hooks.gain_over(str(start), str(end), 8) == {}


def test_interval_bounds_are_a_band_not_panels(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in (0, 3, 6):
            writer.write(step, {"f1": 0.5, "f1_lo": 0.4, "f1_hi": 0.6, "single/f1": 0.7,
                                "single/f1_lo": 0.6, "single/f1_hi": 0.8}, prefix="val")
    series = plot.load_series(read_metrics(tmp_path))
    plan = {group.name: panels for group, panels in plot.plan_panels(list(series))}
    assert plan["validation"] == [("Validation: f1", ["val/f1", "val/single/f1"])]
    assert all(path.endswith(".png") for path in plot.plot_run(tmp_path))


def test_plan_skips_absent_groups_and_null_keys(tmp_path):
    _synthetic_run(tmp_path)
    series = plot.load_series(read_metrics(tmp_path))
    assert "train/vf_loss" not in series
    steps, values = series["val/f1"]
    assert list(steps) == [0, 10, 20, 30, 40, 50] and np.allclose(values, steps / 60)

    plan = {group.name: panels for group, panels in plot.plan_panels(list(series))}
    assert list(plan) == [
        "reward", "validation", "curriculum", "search", "response_length", "optimization",
    ]
    assert plan["reward"] == [("Reward", ["reward/em", "reward/f1"])]
    assert plan["validation"] == [
        ("Validation: cover_em", ["val/cover_em"]),
        ("Validation: f1", ["val/f1", "val/nq/f1"]),
    ]
    assert [keys for _, keys in plan["optimization"]] == [["train/grad_norm"], ["train/kl_loss"]]


def test_load_series_later_row_wins_for_a_repeated_step():
    rows = [
        {"step": 2, "x": 1.0},
        {"step": 1, "x": 5.0},
        {"step": 2, "x": 3.0, "y": None},
        {"step": 3, "x": float("nan"), "z": float("inf")},  # a file written by another tool
    ]
    series = plot.load_series(rows)
    assert list(series) == ["x"]
    assert list(series["x"][0]) == [1, 2] and list(series["x"][1]) == [5.0, 3.0]


def test_moving_average():
    values = np.array([0.0, 3.0, 6.0, 9.0, 30.0])
    assert np.allclose(plot.moving_average(values, 3), [0.0, 3.0, 6.0, 15.0, 30.0])
    assert np.allclose(plot.moving_average(values, 5), [0.0, 3.0, 9.6, 15.0, 30.0])
    assert np.allclose(plot.moving_average(values, 1), values)
    line = np.linspace(-1.0, 2.0, 50)
    assert np.allclose(plot.moving_average(line, 9), line)  # no bend at the ends


def _assert_png(path, min_bytes=10_000):
    data = open(path, "rb").read()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > min_bytes


def test_plot_run_writes_pngs(tmp_path):
    _synthetic_run(tmp_path)
    paths = plot.plot_run(tmp_path)
    plots = tmp_path / plot.PLOTS_DIR
    assert paths == [str(plots / name) for name in (
        "training_curves.png", "reward.png", "validation.png", "curriculum.png", "search.png",
        "response_length.png", "optimization.png",
    )]
    for path in paths:
        _assert_png(path)
    assert not (plots / "throughput.png").exists()


def test_plot_run_short_series_and_out_dir(tmp_path):
    with MetricsWriter(tmp_path / "run", tensorboard=False) as writer:
        for step in range(3):
            writer.write(step, {"throughput/tokens_per_s": 1000.0 + step})
    paths = plot.plot_run(tmp_path / "run" / METRICS_FILE, out_dir=tmp_path / "out")
    assert paths == [str(tmp_path / "out" / n) for n in ("training_curves.png", "throughput.png")]
    for path in paths:
        _assert_png(path, min_bytes=1_000)


def test_cli(tmp_path, capsys):
    _synthetic_run(tmp_path, steps=12)
    assert plot.main(["--workdir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[0] == str(tmp_path / plot.PLOTS_DIR / plot.GRID_FILE)
    assert len(printed) == 7 and all(p.endswith(".png") for p in printed)
    _assert_png(printed[0])


@pytest.mark.parametrize("content", [None, "", '{"step": 0, "time": 1.0, "other": 1}\n'])
def test_cli_missing_or_empty_metrics(tmp_path, capsys, content):
    if content is not None:
        (tmp_path / METRICS_FILE).write_text(content)
    assert plot.main(["--workdir", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "error:" in captured.err and str(tmp_path / METRICS_FILE) in captured.err
    assert not (tmp_path / plot.PLOTS_DIR).exists()


def test_groups_with_spread_counts_the_groups_grpo_learns_from():
    # Three questions of four samples: all right, mixed, all wrong (in shuffled row order).
    rewards = [1, 0, 1, 0.5, 0, 1, 1, 0, 0, 1, 0, 0]
    group = [0, 2, 0, 1, 2, 0, 1, 1, 2, 0, 2, 1]
    assert groups_with_spread(rewards, group) == pytest.approx(1 / 3)
    assert groups_with_spread([0.25] * 4, [7] * 4) == 0.0
    assert groups_with_spread([], []) == 0.0
