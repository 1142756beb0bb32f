"""What a training loop does around its step: validation, checkpoints, preemption, the
non-finite guard and the step's metrics, each a small piece the driver calls.

    checkpointer = Checkpointer(workdir, keep, every)      # resume: checkpointer.restore(...)
    guard = NonfiniteGuard(max_steps)                      # guard.observe(step, n_skipped)
    preempted = Preempted()                                # SIGTERM -> stop at the step's end
    metrics = across_processes(local)                      # the same numbers on every process
    scores = validate(config, params, tokenizer, examples, engine, rollout_config, seed,
                      trace_path=path)               # and each episode as a JSONL line
    gain = gain_over(start_path, end_path, n_questions, seed)  # paired F1 change, interval
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import signal
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from zerosearch_jax import agent, checkpoints, metrics, sampling, search, sharding
from zerosearch_jax.data.iterator import DataIterator
from zerosearch_jax.data.jsonl import read_jsonl, write_jsonl_atomic

logger = logging.getLogger("zerosearch_jax.train")


class Preempted:
    """SIGTERM (TPU preemption) sets a flag; the loop checkpoints and exits at the step end."""

    def __init__(self):
        self.flag = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logger.warning("SIGTERM received: saving a checkpoint after this step")
        self.flag = True

    def any_process(self) -> bool:
        """Whether any process saw a SIGTERM: all stop at the same step (and save together)."""
        return bool(sharding.allgather(np.array(self.flag)).any())


class Checkpointer:
    """Orbax checkpoints of the train state and the data position in `<workdir>/checkpoints`,
    every `every` steps and at the end; the newest intact one is restored."""

    def __init__(self, workdir: str, keep: int, every: int):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.every, self.keep = every, keep
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True))

    def restore(self, state: Any, shardings: Any, data: DataIterator) -> tuple[int, Any]:
        """(the step to start from, the state): the newest step that loads and matches the
        checksums saved with it (damaged ones are set aside with a warning saying why), with
        the data position restored into `data`; (0, state) when there is none."""
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                state, shardings)
        restored = checkpoints.restore_latest_intact(self.manager, abstract)
        if restored is None:
            return 0, state
        _, state, meta = restored
        data.restore(meta["data"])
        logger.info("resumed from %s at step %d", self.directory, int(meta["step"]))
        return int(meta["step"]), state

    def require_room(self, state: Any, start: int, total: int, export_bytes: int = 0) -> None:
        """Fails before the loop (`checkpoints.DiskSpaceError`) when the disk cannot hold what
        the steps from `start` to `total` will keep: up to `keep` steps plus the one being
        written (less the steps already there), and `export_bytes` written at the end."""
        saves = sum(1 for done in range(start + 1, total + 1)
                    if done % self.every == 0 or done == total)
        size = checkpoints.state_bytes(state)
        on_disk = checkpoints.directory_bytes(self.directory)
        need = max(0, min(self.keep + 1, saves + len(self.manager.all_steps())) * size
                   - on_disk) + export_bytes
        checkpoints.require_free_space(
            self.directory, need, f"this run's checkpoints (steps of {size / 1e9:.2f} GB, "
            f"checkpoint.keep={self.keep}, {on_disk / 1e9:.2f} GB already saved) and its "
            f"final export ({export_bytes / 1e9:.2f} GB)")

    def maybe_save(self, done: int, total: int, state: Any, data: DataIterator, seed: int,
                   force: bool = False) -> None:
        if done % self.every == 0 or done == total or force:
            checkpoints.save(self.manager, done, state,
                             {"step": done, "data": data.state(), "seed": seed})


class NonfiniteGuard:
    """Counts consecutive steps with skipped (non-finite) updates; too many stop the run. A
    step with a skipped update is not saved, so the last checkpoint is the last good one."""

    def __init__(self, max_steps: int, checkpoint_dir: str, latest_step):
        self.max_steps, self.streak = max_steps, 0
        self.checkpoint_dir, self.latest_step = checkpoint_dir, latest_step

    def observe(self, step: int, skipped: float) -> None:
        self.streak = self.streak + 1 if skipped else 0
        if self.streak:
            logger.warning("step %d: %d update(s) skipped for a non-finite loss or gradient",
                           step, int(skipped))
        if self.streak >= self.max_steps:
            raise RuntimeError(
                f"{self.streak} consecutive steps had non-finite losses or gradients "
                f"(max_nonfinite_steps={self.max_steps}); stopping. The last good checkpoint "
                f"(step {self.latest_step()}) in {self.checkpoint_dir} is intact.")


def across_processes(local: dict[str, float]) -> dict[str, float]:
    """Every process's step metrics reduced to the same numbers on each: the mean of the
    per-process means (every process rolls out as many episodes) and the slowest process's
    `time/*`."""
    keys = sorted(local)
    rows = sharding.allgather(np.array([local[k] for k in keys], np.float64))
    return {k: float(rows[:, i].max() if k.startswith("time/") else rows[:, i].mean())
            for i, k in enumerate(keys)}


def validate(config, params, tokenizer, examples, engine: search.SearchEngine,
             rollout_config: agent.RolloutConfig, seed: int,
             placement: sharding.Placement | None = None,
             trace_path: str | None = None) -> dict[str, float]:
    """Greedy episodes on the validation questions: EM / cover EM / F1 and searches per
    question, overall and per source, with the 95% bootstrap interval of each F1 (`f1_lo`,
    `f1_hi`: the questions resampled).

    With several processes each one rolls out every process_count-th question (params on its
    `placement`) and the per-question scores are gathered, so all return the same numbers.
    With `trace_path`, each episode (question, gold, the whole response with its inserted
    documents, the answer, F1, searches) is written there as JSONL, atomically; with several
    processes each writes its own questions (`step_000006.p1.jsonl` for process 1).
    """
    rc = dataclasses.replace(rollout_config, samples_per_prompt=1)
    n_proc, me = jax.process_count(), jax.process_index()
    mine = examples[me::n_proc]
    _, stats = agent.rollout(config, params, tokenizer, mine, engine, rollout_config=rc,
                             sampler=sampling.Greedy(), rng=seed, placement=placement)
    if trace_path is not None:
        write_traces(process_path(trace_path), mine, stats)
    scores = np.stack([stats.f1, stats.em, stats.cover_em, stats.searches]).astype(np.float64)
    if n_proc > 1:
        padded = np.full((len(scores), -(-len(examples) // n_proc)), np.nan)
        padded[:, :len(mine)] = scores
        gathered = sharding.allgather(padded)  # [process, score, slot]
        i = np.arange(len(examples))  # question i is process i % n's (i // n)-th
        scores = gathered[i % n_proc, :, i // n_proc].T
    f1, em, cover_em, searches = scores
    out = {"f1": float(f1.mean()), "em": float(em.mean()), "cover_em": float(cover_em.mean()),
           "searches": float(searches.mean())}
    out["f1_lo"], out["f1_hi"] = metrics.bootstrap_interval(f1, seed=seed)
    sources = np.array([e.data_source for e in examples])
    for src in sorted(set(sources)):
        sel = sources == src
        out[f"{src}/f1"] = float(f1[sel].mean())
        out[f"{src}/f1_lo"], out[f"{src}/f1_hi"] = metrics.bootstrap_interval(f1[sel], seed=seed)
        out[f"{src}/cover_em"] = float(cover_em[sel].mean())
        out[f"{src}/searches"] = float(searches[sel].mean())
    return out


def episode_files(path: str) -> list[str]:
    """The files `validate(trace_path=path)` wrote: `path`, or each process's
    (`step_000006.p1.jsonl`, `process_path`); [] when there are none."""
    root, ext = os.path.splitext(path)
    return sorted({*glob.glob(glob.escape(path)), *glob.glob(f"{glob.escape(root)}.p*{ext}")})


def validation_scores(path: str) -> dict[tuple[str, str], tuple[str, float]]:
    """{(question id, question): (data source, F1)} from a validation's episodes written by
    `validate(trace_path=path)` (`episode_files`); {} when there are none. Malformed lines are
    skipped with a warning."""
    out = {}
    for f in episode_files(path):
        for row in read_jsonl(f, on_error="skip"):
            try:
                out[(str(row["id"]), str(row["question"]))] = (str(row["data_source"]),
                                                               float(row["f1"]))
            except (KeyError, TypeError, ValueError) as e:
                logger.warning("%s: skipping a validation episode without id, question, "
                               "data_source and f1 (%s)", f, e)
    return out


def gain_over(start_path: str, end_path: str, n_questions: int,
              seed: int = 0) -> dict[str, float]:
    """The change in validation F1 from one validation to another of the same questions
    (their episodes at `start_path` and `end_path`, as `validate` writes them), question by
    question: `gain_f1` with its paired 95% bootstrap interval (`gain_f1_lo`, `gain_f1_hi`;
    `metrics.paired_gain`), overall and per source (`<source>/gain_f1`, ...). {} (logged) when
    either file is missing or they do not both hold the same `n_questions` questions."""
    start, end = validation_scores(start_path), validation_scores(end_path)
    if not start or not end:
        logger.info("no episodes of %s: the F1 gain over it is not computed",
                    start_path if not start else end_path)
        return {}
    if start.keys() != end.keys() or len(end) != n_questions:
        logger.warning("%s and %s hold different questions (%d and %d of %d): the F1 gain is "
                       "not computed", start_path, end_path, len(start), len(end), n_questions)
        return {}
    keys = sorted(end)
    sources = np.array([end[k][0] for k in keys])
    before = np.array([start[k][1] for k in keys])
    after = np.array([end[k][1] for k in keys])
    out = {}
    parts = [("", slice(None))] + [(f"{s}/", sources == s) for s in sorted(set(sources))]
    for prefix, sel in parts:
        gain, lo, hi = metrics.paired_gain(before[sel], after[sel], seed=seed)
        out.update({f"{prefix}gain_f1": gain, f"{prefix}gain_f1_lo": lo,
                    f"{prefix}gain_f1_hi": hi})
    return out


def process_path(path: str) -> str:
    """`path` for this process: unchanged with one process, `step_000006.p1.jsonl` for process
    1 of several (each writes the episodes it rolled out)."""
    if jax.process_count() == 1:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.p{jax.process_index()}{ext}"


def write_traces(path: str, examples, stats: agent.EpisodeStats, **columns) -> None:
    """One JSON line per episode, replacing `path` atomically: the question, the answer, F1,
    searches, each engine call's query and coin (`useful`: None for a real engine), the whole
    response. examples[i] is episode i's question; `columns` adds per-episode values (name ->
    [B] sequence of numbers), e.g. a training step's GRPO `group`."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def row(i, e):
        out = {"id": e.id, "data_source": e.data_source, "question": e.question,
               "golden_answers": list(e.golden_answers), "answer": stats.answers[i],
               "f1": float(stats.f1[i]), "searches": int(stats.searches[i])}
        if stats.calls:
            out["calls"] = [{"query": c.query, "useful": c.useful} for c in stats.calls[i]]
        out.update({k: np.asarray(v[i]).item() for k, v in columns.items()})
        return out | {"response": stats.responses[i]}

    write_jsonl_atomic(path, (row(i, e) for i, e in enumerate(examples)))
