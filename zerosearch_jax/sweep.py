"""Config sweeps: one training run per point of a list (or grid) of config overrides.

    python -m zerosearch_jax.sweep --config=configs/default.py \\
        --sweep=configs/sweeps/default_lr_estimator.py --workdir=runs/sweep \\
        [--dry-run] [--max_parallel=1] [--nokeep_checkpoints] [--only=seed=0] \\
        [-- --config.total_steps=4 ...]
    python -m zerosearch_jax.sweep --summarize --workdir=runs/sweep

A sweep file defines `get_sweep()`, returning a list of override dicts such as
`{"optim.lr": 1e-6, "algorithm.estimator": "grpo"}`; `product(**axes)` builds a grid. Each point
runs

    python -m zerosearch_jax.train --config=<config> --config.<key>=<value> ... \\
        [extra overrides] --workdir=<workdir>/<point>

as a subprocess, logging to `<workdir>/<point>/train.log`. The point's directory name is made
from its overrides (`estimator=grpo,lr=1e-06`), so it does not depend on the order of the list.

Every override is checked before anything is launched: it is applied to the config with
ml_collections' own flag parser (the one train.py uses: unknown keys and unparsable values fail
there) and the resulting config goes through `train.build_settings` (values that cannot work).

Re-running the same command resumes the sweep: points whose `final_validation.json` exists are
skipped, and an interrupted point restarts in its own workdir, where train.py resumes from its
latest checkpoint. `--only=<key>=<value>` (repeatable) runs a part of the sweep, e.g. one seed
of every row first, and leaves the rest pending in the plan and the summary. A point that
fails is reported and the others go on. At the end `<workdir>/summary.md` and `summary.csv`
hold one row per point (overrides, status, steps, last training reward, final validation
metrics), and the table is printed; `--summarize` rebuilds them from the directories alone,
e.g. while a sweep is still running.

Files: `<workdir>/sweep.json` (the plan: config, sweep file, extra overrides, the points) and
`<workdir>/<point>/sweep_point.json` (the point's overrides, its command, its exit code).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zerosearch_jax.metrics import METRICS_FILE, read_metrics

PLAN_FILE = "sweep.json"
POINT_FILE = "sweep_point.json"
LOG_FILE = "train.log"
CHECKPOINT_DIR = "checkpoints"  # a point's orbax checkpoints (hooks.Checkpointer's directory)
FINAL_FILE = "final_validation.json"
SUMMARY_MD = "summary.md"
SUMMARY_CSV = "summary.csv"
REWARD_KEY = "reward/f1"  # the training reward column of the summary (last logged value)
_MAX_NAME = 120  # characters of a point's directory name before it is shortened with a hash


class SweepError(ValueError):
    """A sweep that cannot run as asked; the message names the point, key or file."""


# ----------------------------------------------------------------------------------------------
# Points: sweep files, grids, names, flags.
# ----------------------------------------------------------------------------------------------


def product(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    """The grid over `axes` ({config key: values}); the first axis varies slowest.

    `product(**{"optim.lr": [1e-6, 3e-6], "algorithm.estimator": ["grpo", "reinforce"]})` gives
    four points: (1e-6, grpo), (1e-6, reinforce), (3e-6, grpo), (3e-6, reinforce).
    """
    for key, values in axes.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise SweepError(f"axis {key!r} must be a non-empty list of values, got {values!r}")
    keys = list(axes)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes.values())]


@dataclasses.dataclass(frozen=True)
class Point:
    name: str  # directory name under the sweep's workdir
    overrides: dict[str, Any]  # {config key: value}, as the sweep file gave them
    flags: tuple[str, ...]  # ("--config.optim.lr=1e-06", ...), what train.py receives


def load_sweep(path: str) -> list[dict[str, Any]]:
    """Imports a sweep file and returns its `get_sweep()`, checked for shape."""
    if not os.path.isfile(path):
        raise SweepError(f"--sweep={path}: no such file (a Python file defining get_sweep())")
    spec = importlib.util.spec_from_file_location("_zerosearch_sweep_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_sweep", None)):
        raise SweepError(f"{path} must define get_sweep() returning a list of override dicts")
    points = module.get_sweep()
    if not isinstance(points, (list, tuple)) or not points:
        raise SweepError(f"{path}: get_sweep() must return a non-empty list of dicts, "
                         f"got {points!r}")
    for i, overrides in enumerate(points):
        if not isinstance(overrides, Mapping):
            raise SweepError(f"{path}: point {i} must be a dict of overrides, got {overrides!r}")
        for key, value in overrides.items():
            if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
                raise SweepError(f"{path}: point {i}: key {key!r} must be a dotted config path "
                                 f"such as 'optim.lr' (no '--config.' prefix)")
            if isinstance(value, Mapping):
                raise SweepError(f"{path}: point {i}: {key!r} is a dict; give each field as its "
                                 f"own dotted key ('{key}.<field>')")
    return [dict(p) for p in points]


def flag_value(value: Any) -> str:
    """The command-line text of an override value (train.py parses it by the field's type)."""
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(flag_value(v) for v in value) + ("," if len(value) == 1 else "") \
            + ")"
    return str(value)


def _slug(text: str) -> str:
    text = re.sub(r"\s+", "", text).replace(",", "_")
    return re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9._+=-]", "-", text)).strip("-") or "empty"


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def make_points(sweep: Sequence[Mapping[str, Any]]) -> list[Point]:
    """Names each point after its overrides: `<key>=<value>` joined by commas.

    A key is shortened to its last component (`lr` for `optim.lr`) unless two keys of the sweep
    share it (`rollout.temperature`, `simulator.temperature`). Names that still collide (after
    replacing characters unfit for a path) or run long get a hash of the overrides appended.
    """
    keys = list(dict.fromkeys(k for overrides in sweep for k in overrides))
    last = [k.rsplit(".", 1)[-1] for k in keys]
    short = {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}
    seen: dict[str, int] = {}
    names = []
    for i, overrides in enumerate(sweep):
        digest = _digest(overrides)
        if digest in seen:
            raise SweepError(f"point {i} repeats point {seen[digest]}: {dict(overrides)}")
        seen[digest] = i
        name = ",".join(f"{short[k]}={_slug(flag_value(v))}" for k, v in overrides.items())
        name = name or "base"
        if len(name) > _MAX_NAME:
            name = f"{name[:_MAX_NAME - 9]}-{digest}"
        names.append(name)
    clashes = {n for n in names if names.count(n) > 1}
    names = [f"{n}-{_digest(o)}" if n in clashes else n for n, o in zip(names, sweep, strict=True)]
    return [Point(name, dict(o), tuple(f"--config.{k}={flag_value(v)}" for k, v in o.items()))
            for name, o in zip(names, sweep, strict=True)]


def _override_key(flag: str) -> str:
    return flag[len("--config."):].split("=", 1)[0]


def check_extra_flags(extra: Sequence[str], points: Sequence[Point]) -> None:
    """Extra overrides apply to every point; they may not re-set a swept key."""
    swept = {k for p in points for k in p.overrides}
    for flag in extra:
        if not re.fullmatch(r"--config\.[A-Za-z_][\w.]*=.*", flag, flags=re.S):
            raise SweepError(f"extra argument {flag!r}: expected --config.<key>=<value>")
        if _override_key(flag) in swept:
            raise SweepError(f"{flag} sets {_override_key(flag)!r}, which the sweep varies; "
                             f"drop it or remove the key from the sweep")


def select_points(points: Sequence[Point], only: Sequence[str]) -> list[str]:
    """Names of the points whose overrides match every `key=value` filter of `only`.

    `key` is a swept config key, whole (`algorithm.estimator`) or by its last component
    (`estimator`, as point names spell it); `value` is compared with the override's command-line
    text (`flag_value`). `--only=seed=0` runs one seed of every row of a sweep first; the other
    points stay in the plan (and the summary, as pending) for a later run without the filter.
    """
    swept = list(dict.fromkeys(k for p in points for k in p.overrides))
    selected = [p.name for p in points]
    for text in only:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise SweepError(f"--only={text}: expected <key>=<value>, e.g. --only=seed=0")
        matches = [k for k in swept if key in (k, k.rsplit(".", 1)[-1])]
        if len(matches) != 1:
            why = "names several keys" if matches else "is not a key this sweep varies"
            raise SweepError(f"--only={text}: {key!r} {why} (swept: {', '.join(swept)})")
        keep = {p.name for p in points if matches[0] in p.overrides
                and flag_value(p.overrides[matches[0]]) == value}
        selected = [n for n in selected if n in keep]
    if not selected:
        raise SweepError(f"--only {' '.join(only)} selects no point of the sweep")
    return selected


# ----------------------------------------------------------------------------------------------
# Validation: ml_collections' parser, then train.build_settings.
# ----------------------------------------------------------------------------------------------


def resolve_config(config_path: str, flags: Sequence[str]):
    """The config train.py would run with `--config=<config_path> <flags>`.

    Uses a private absl FlagValues, so it can be called for many points and beside the
    process's own flags.
    """
    from absl import flags as absl_flags
    from ml_collections import config_flags

    argv = ["zerosearch_jax.sweep", f"--config={config_path}", *flags]
    values = absl_flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "config file", flag_values=values,
                                             lock_config=True, sys_argv=argv)
    values(argv)
    return holder.value


def _check_key(config, key: str, where: str) -> None:
    node, done = config, []
    for part in key.split("."):
        children = list(node.keys()) if hasattr(node, "keys") else []
        if part not in children:
            parent = ".".join(done) or "the config"
            raise SweepError(f"{where}: unknown config key {key!r}; {parent} has "
                             f"{', '.join(sorted(children)) or 'no fields'}")
        node, done = node[part], done + [part]


def validate(config_path: str, points: Sequence[Point], extra: Sequence[str]) -> None:
    """Raises SweepError, naming the point and key, if any point's config cannot run."""
    from zerosearch_jax import train

    if not os.path.isfile(config_path):
        raise SweepError(f"--config={config_path}: no such file (e.g. configs/default.py)")
    try:
        base = resolve_config(config_path, [])
    except Exception as e:  # any failure to load the config file, reported with its path
        raise SweepError(f"--config={config_path}: cannot load: {e}") from e
    for flag in extra:
        _check_key(base, _override_key(flag), f"extra override {flag}")
    for point in points:
        for flag in point.flags:
            _check_key(base, _override_key(flag), f"point {point.name!r}")
        try:
            config = resolve_config(config_path, [*point.flags, *extra])
        except Exception as e:  # the flag parser's own message names the flag and the value
            raise SweepError(f"point {point.name!r}: {e}") from e
        try:
            train.build_settings(config)
        except train.ConfigError as e:
            raise SweepError(f"point {point.name!r}: {e}") from e


# ----------------------------------------------------------------------------------------------
# Running.
# ----------------------------------------------------------------------------------------------


def train_command(config_path: str, point: Point, extra: Sequence[str], workdir: Path,
                  python: str = sys.executable) -> list[str]:
    return [python, "-m", "zerosearch_jax.train", f"--config={config_path}", *point.flags,
            *extra, f"--workdir={workdir}"]


def _read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def _check_resumable(root: Path, points: Sequence[Point], commands: Mapping[str, list[str]]):
    """A point directory left by an earlier sweep must have been started with the same command:
    resuming it with other overrides would mix two runs in one checkpoint history."""
    for point in points:
        record = root / point.name / POINT_FILE
        if record.exists():
            before = _read_json(record).get("command", [])[1:]
            if before != commands[point.name][1:]:
                raise SweepError(
                    f"{root / point.name} was started with a different command:\n  "
                    f"{shlex.join(before)}\nnow:\n  {shlex.join(commands[point.name][1:])}\n"
                    f"use another --workdir, or delete that directory to start the point over")


def run_sweep(config_path: str, points: Sequence[Point], extra: Sequence[str], root: str | Path,
              *, sweep_path: str = "", max_parallel: int = 1, dry_run: bool = False,
              keep_checkpoints: bool = True, python: str = sys.executable,
              poll_s: float = 0.5, only: Sequence[str] | None = None) -> dict[str, str]:
    """Runs the points not done yet, `max_parallel` at a time; returns {point: status}.

    `only` (point names, from `select_points`) restricts what runs; the plan keeps every point,
    so the summary lists the others as pending and a later run without it finishes them.

    Statuses: done, skipped (done before), failed (exit N), interrupted. With
    `keep_checkpoints=False` a point that finished has its `checkpoints/` removed (about 3 GB
    a point for a 135M policy: the optimizer state); its metrics, plots, final validation and
    `hf_policy/` stay. A failed or interrupted point keeps them, so a re-run resumes it.
    """
    if max_parallel < 1:
        raise SweepError(f"--max_parallel must be >= 1, got {max_parallel}")
    root = Path(root).absolute()
    config_path = os.path.abspath(config_path)
    commands = {p.name: train_command(config_path, p, extra, root / p.name, python)
                for p in points}
    _check_resumable(root, points, commands)
    chosen = [p for p in points if only is None or p.name in only]
    todo = [p for p in chosen if not (root / p.name / FINAL_FILE).exists()]
    status = {p.name: "skipped" for p in chosen if p not in todo}
    for name in status:
        print(f"skip {name}: {FINAL_FILE} exists")
    if dry_run:
        for p in todo:
            print(f"run  {p.name}: {shlex.join(commands[p.name])}")
        return status

    root.mkdir(parents=True, exist_ok=True)
    _write_json(root / PLAN_FILE, {
        "config": config_path, "sweep": os.path.abspath(sweep_path) if sweep_path else "",
        "extra_overrides": list(extra),
        "points": [{"name": p.name, "overrides": p.overrides} for p in points]})
    running: dict[str, tuple[subprocess.Popen, Any]] = {}
    queue = list(todo)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # preemption of the sweep host
    try:
        while queue or running:
            while queue and len(running) < max_parallel:
                point = queue.pop(0)
                pdir = root / point.name
                pdir.mkdir(parents=True, exist_ok=True)
                record = {"name": point.name, "overrides": point.overrides,
                          "command": commands[point.name], "started": time.time()}
                _write_json(pdir / POINT_FILE, record)
                log = open(pdir / LOG_FILE, "ab")
                print(f"start {point.name} (log: {pdir / LOG_FILE})", flush=True)
                # A session of its own: a Ctrl-C in the terminal reaches only the sweep, which
                # then sends SIGTERM (the trainer's checkpoint-and-exit signal) to each point.
                proc = subprocess.Popen(commands[point.name], stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
                running[point.name] = (proc, log)
            time.sleep(poll_s)
            for name, (proc, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                status[name] = _finish(root / name, proc.returncode)
                if status[name] == "done" and not keep_checkpoints:
                    _drop_checkpoints(root / name)
    except KeyboardInterrupt:
        # SIGTERM makes train.py checkpoint at the end of its step, so a re-run resumes there.
        print(f"interrupted: sending SIGTERM to {len(running)} running point(s)", flush=True)
        for proc, _ in running.values():
            proc.send_signal(signal.SIGTERM)
        for name, (proc, log) in running.items():
            proc.wait()
            log.close()
            _finish(root / name, proc.returncode)
            status[name] = "interrupted"
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return status


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _finish(pdir: Path, returncode: int) -> str:
    record = _read_json(pdir / POINT_FILE)
    record.update(returncode=returncode, finished=time.time())
    _write_json(pdir / POINT_FILE, record)
    if returncode == 0 and (pdir / FINAL_FILE).exists():
        print(f"done  {pdir.name}", flush=True)
        return "done"
    tail = _tail(pdir / LOG_FILE, 15)
    print(f"FAILED {pdir.name} (exit {returncode}); last lines of {pdir / LOG_FILE}:\n{tail}",
          flush=True)
    return f"failed (exit {returncode})"


def _drop_checkpoints(pdir: Path) -> None:
    ckpt = pdir / CHECKPOINT_DIR
    if ckpt.is_dir():
        size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        shutil.rmtree(ckpt)
        print(f"      {pdir.name}: removed {ckpt.name}/ ({size / 2**30:.1f} GiB; "
              f"--keep_checkpoints=False)", flush=True)


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError:
        return "(no log)"


# ----------------------------------------------------------------------------------------------
# Summary.
# ----------------------------------------------------------------------------------------------


def point_row(pdir: Path, name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """One summary row, from what the point's directory holds now."""
    row: dict[str, Any] = {"point": name, "status": "pending", **{
        k: flag_value(v) for k, v in overrides.items()}}
    record = _read_json(pdir / POINT_FILE) if (pdir / POINT_FILE).exists() else {}
    final = pdir / FINAL_FILE
    if final.exists():
        row["status"] = "done"
    elif record.get("returncode") not in (None, 0):
        row["status"] = f"failed (exit {record['returncode']})"
    elif record.get("returncode") == 0:
        row["status"] = f"failed (exit 0, no {FINAL_FILE})"
    elif pdir.exists():
        row["status"] = "incomplete"  # running now, or interrupted: re-running resumes it
    if (pdir / "config.json").exists():
        row["total_steps"] = _read_json(pdir / "config.json").get("total_steps")
    if (pdir / METRICS_FILE).exists():
        rows = read_metrics(pdir)
        row["steps"] = max((r["step"] for r in rows), default=None)
        rewards = [r[REWARD_KEY] for r in rows if r.get(REWARD_KEY) is not None]
        row[f"last {REWARD_KEY}"] = rewards[-1] if rewards else None
    if final.exists():
        row.update({f"val/{k}": v for k, v in _read_json(final).items()})
    return row


def summarize(root: str | Path) -> list[dict[str, Any]]:
    """Rows for every point of the sweep planned in `<root>/sweep.json`, in plan order."""
    root = Path(root)
    if not (root / PLAN_FILE).exists():
        raise SweepError(f"{root} has no {PLAN_FILE}: not a sweep directory (run the sweep "
                         f"first, or point --workdir at the sweep's root)")
    plan = _read_json(root / PLAN_FILE)
    return [point_row(root / p["name"], p["name"], p["overrides"]) for p in plan["points"]]


def _columns(rows: Sequence[Mapping[str, Any]], markdown: bool) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fixed = ["point", "status"]
    val = sorted((k for k in keys if k.startswith("val/")),
                 key=lambda k: (k.count("/") > 1, k))
    if markdown:  # the overall metrics; per-data-source ones are in the CSV
        val = [k for k in val if k.count("/") == 1]
    stats = [k for k in ("steps", "total_steps", f"last {REWARD_KEY}") if k in keys]
    overrides = [k for k in keys if k not in fixed and k not in stats and not k.startswith("val/")]
    return fixed + overrides + stats + val


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    cols = _columns(rows, markdown=True)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)).replace("|", "\\|") for c in cols) + " |"
              for r in rows]
    return "\n".join(lines)


def write_summary(root: str | Path, rows: Sequence[Mapping[str, Any]]) -> str:
    """Writes `summary.csv` (every column) and `summary.md`; returns the markdown table."""
    root = Path(root)
    plan = _read_json(root / PLAN_FILE)
    cols = _columns(rows, markdown=False)
    with open(root / SUMMARY_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows({c: ("" if r.get(c) is None else r.get(c)) for c in cols} for r in rows)
    table = markdown_table(rows)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"].split(" ")[0]] = counts.get(r["status"].split(" ")[0], 0) + 1
    extra = " ".join(plan.get("extra_overrides", [])) or "none"
    with open(root / SUMMARY_MD, "w") as f:
        f.write(f"# Sweep summary: {root}\n\n"
                f"- config: `{plan['config']}`\n- sweep: `{plan.get('sweep') or '-'}`\n"
                f"- extra overrides: `{extra}`\n"
                f"- points: {len(rows)} ({', '.join(f'{v} {k}' for k, v in counts.items())})\n\n"
                f"{table}\n\nEvery column, per-data-source validation metrics included, is in "
                f"`{SUMMARY_CSV}`. `val/*` are the final validation metrics; "
                f"`last {REWARD_KEY}` is the training reward of the last logged step.\n")
    return table


# ----------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Takes the `--config.<key>=<value>` overrides out of argv (before or after `--`): absl
    knows only the sweep's own flags."""
    rest, extra = [argv[0]], []
    for arg in argv[1:]:
        (extra if arg.startswith("--config.") else rest).append(arg)
    return rest, extra


def main(argv: Sequence[str] | None = None) -> None:
    from absl import app, flags

    argv, extra = _split_overrides(list(sys.argv if argv is None else argv))
    flags.DEFINE_string("config", None, "ml_collections config file, e.g. configs/default.py")
    flags.DEFINE_string("sweep", None, "sweep file defining get_sweep()")
    flags.DEFINE_string("workdir", None, "sweep root: one run directory per point",
                        required=True)
    flags.DEFINE_bool("dry_run", False, "validate and print the commands; run nothing")
    flags.DEFINE_alias("dry-run", "dry_run")
    flags.DEFINE_integer("max_parallel", 1, "points run at the same time")
    flags.DEFINE_bool("summarize", False, "only rebuild summary.md / summary.csv")
    flags.DEFINE_multi_string("only", [], "run only the points whose overrides match "
                              "<key>=<value> (repeatable), e.g. --only=seed=0; the plan and "
                              "summary keep every point")
    flags.DEFINE_bool("keep_checkpoints", True,
                      "keep each finished point's checkpoints/ (False: remove them once the "
                      "point is done; its metrics, plots and hf_policy/ stay)")
    FLAGS = flags.FLAGS

    def run(args: Sequence[str]) -> int:
        try:
            if len(args) > 1:
                raise SweepError(f"unexpected arguments {args[1:]}: overrides are "
                                 f"--config.<key>=<value>")
            if not FLAGS.summarize:
                missing = [f"--{n}" for n in ("config", "sweep") if not FLAGS[n].value]
                if missing:
                    raise SweepError(f"{' and '.join(missing)} required (or --summarize)")
                if FLAGS.max_parallel < 1:
                    raise SweepError(f"--max_parallel must be >= 1, got {FLAGS.max_parallel}")
                points = make_points(load_sweep(FLAGS.sweep))
                check_extra_flags(extra, points)
                only = select_points(points, FLAGS.only) if FLAGS.only else None
                validate(FLAGS.config, points, extra)
                print(f"{len(points)} point(s) valid; workdir {FLAGS.workdir}"
                      + (f"; running {len(only)} (--only)" if only else ""), flush=True)
                try:
                    status = run_sweep(FLAGS.config, points, extra, FLAGS.workdir,
                                       sweep_path=FLAGS.sweep, max_parallel=FLAGS.max_parallel,
                                       dry_run=FLAGS.dry_run,
                                       keep_checkpoints=FLAGS.keep_checkpoints, only=only)
                except KeyboardInterrupt:
                    print(write_summary(FLAGS.workdir, summarize(FLAGS.workdir)))
                    print("interrupted; the same command resumes the sweep", file=sys.stderr)
                    return 130
                if FLAGS.dry_run:
                    return 0
            table = write_summary(FLAGS.workdir, summarize(FLAGS.workdir))
        except SweepError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(table)
        print(f"\nwrote {Path(FLAGS.workdir) / SUMMARY_MD} and {Path(FLAGS.workdir) / SUMMARY_CSV}")
        if FLAGS.summarize:
            return 0
        failed = [n for n, s in status.items() if s.startswith("failed")]
        if failed:
            print(f"{len(failed)} point(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1 if failed else 0

    app.run(lambda a: sys.exit(run(a)), argv=argv)


if __name__ == "__main__":
    main()
