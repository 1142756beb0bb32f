"""The simulator-tuning pipeline: collect -> label -> fine-tune -> report, each stage resumable.

    python -m zerosearch_jax.simulator_sft --config=configs/simulator_sft.py --workdir=runs/sim

Files in the workdir:
- `collect.jsonl`: one record per question with its search calls (append-only; a re-run skips
  the questions already there);
- `sft_train.jsonl`, `sft_heldout.jsonl`: the labelled, balanced examples (rebuilt each run from
  the collection and `label.pairs`; deterministic from the seed);
- `checkpoints/`, `metrics.jsonl`, `plots/`: the fine-tuning (resumed from its checkpoints);
- `hf/`: the tuned simulator as a Hugging Face directory (its presence means tuning is done);
- `report.md`, `report.json`, `report.png`: the quality report, tuned vs prompted base model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections

from zerosearch_jax import agent, models, sampling
from zerosearch_jax.cli import run_command
from zerosearch_jax.data import qa
from zerosearch_jax.data.jsonl import read_jsonl, write_jsonl_atomic
from zerosearch_jax.inputs import ConfigError, load_examples, make_engine
from zerosearch_jax.plot import plot_run
from zerosearch_jax.settings import build
from zerosearch_jax.simulator_sft import collect as collect_lib
from zerosearch_jax.simulator_sft import finetune as finetune_lib
from zerosearch_jax.simulator_sft import label as label_lib
from zerosearch_jax.simulator_sft import report as report_lib
from zerosearch_jax.tokenizer import Tokenizer

logger = logging.getLogger("zerosearch_jax.simulator_sft")


@dataclasses.dataclass(frozen=True)
class Settings:
    collect: collect_lib.CollectConfig
    rollout: agent.RolloutConfig
    sampler: sampling.TopP
    label: label_lib.LabelConfig
    finetune: finetune_lib.SFTConfig


def build_settings(c: ml_collections.ConfigDict, prefix: str = "config.") -> Settings:
    """Validates the config before any work; errors name the key (`prefix` + its path)."""
    if c.data.num_questions < 0:
        raise ConfigError(f"{prefix}data.num_questions = {c.data.num_questions}: expected >= 0")
    if c.data.num_questions == 0 and not c.label.pairs:
        raise ConfigError(f"{prefix}data.num_questions = 0 and no {prefix}label.pairs: nothing to "
                          "tune on")
    if c.collect.engine not in ("bm25", "searchr1", "serpapi"):
        raise ConfigError(f"{prefix}collect.engine = {c.collect.engine!r}: expected bm25, "
                          "searchr1 or serpapi")
    if c.label.judge == "llm" and not c.label.judge_url:
        raise ConfigError(f"{prefix}label.judge = 'llm' needs {prefix}label.judge_url")
    if c.label.on_error not in ("raise", "skip"):
        raise ConfigError(f"{prefix}label.on_error = {c.label.on_error!r}: expected raise or skip")
    if not 0 <= c.label.heldout_fraction < 1:
        raise ConfigError(f"{prefix}label.heldout_fraction = {c.label.heldout_fraction}: expected "
                          "a value in [0, 1)")
    if c.label.pairs and not os.path.exists(c.label.pairs):
        raise ConfigError(f"{prefix}label.pairs = {c.label.pairs!r}: no such file")
    if c.collect.depth < c.label.topk:
        raise ConfigError(f"{prefix}collect.depth = {c.collect.depth}: must be >= {prefix}label."
                          f"topk = {c.label.topk}")
    sources = tuple(s.strip() for s in c.collect.query_sources.split(",") if s.strip())
    at = prefix.removeprefix("config.")  # build() names keys from config.
    cc = build(collect_lib.CollectConfig, c.collect, f"{at}collect",
               query_sources=sources, seed=c.seed)
    rc = build(agent.RolloutConfig, c.collect, f"{at}collect", samples_per_prompt=1)
    sampler = build(sampling.TopP, c.collect, f"{at}collect", p=c.collect.top_p)
    lc = build(label_lib.LabelConfig, c.label, f"{at}label", seed=c.seed)
    sc = build(finetune_lib.SFTConfig, c.finetune, f"{at}finetune", seed=c.seed)
    if c.report.num_queries < 0 or c.report.max_new_tokens < 1:
        raise ConfigError(f"{prefix}report: num_queries must be >= 0 and max_new_tokens >= 1")
    return Settings(cc, rc, sampler, lc, sc)


def run(c: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> str:
    """Runs (or finishes) every stage; returns the tuned simulator's HF directory."""
    settings = build_settings(c)
    # The models exist before collection spends time (or paid search calls).
    for key in ("simulator", "collect.policy"):
        name = c.simulator if key == "simulator" else c.collect.policy
        if key == "collect.policy" and not (c.data.num_questions
                                            and "policy" in settings.collect.query_sources):
            continue
        try:
            models.resolve_model(name)
        except models.WeightsError as e:
            raise ConfigError(f"config.{key}: {e}") from None
    os.makedirs(workdir, exist_ok=True)
    hf_dir = os.path.join(workdir, "hf")
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(c.to_json_best_effort(indent=2))
    timings = {}
    t0 = time.perf_counter()
    pairs = collect(c, settings, workdir, progress)
    timings["collect_s"] = time.perf_counter() - t0
    train_ex, heldout = label(c, settings, pairs, workdir)
    t0 = time.perf_counter()
    finetune(c, settings, train_ex, workdir, hf_dir, progress)
    timings["finetune_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if c.report.num_queries and not os.path.exists(os.path.join(workdir, "report.json")):
        report(c, heldout, hf_dir, workdir)
    timings["report_s"] = time.perf_counter() - t0
    logger.info("simulator tuning done: %s; timings %s", hf_dir,
                {k: round(v, 1) for k, v in timings.items()})
    return hf_dir


def collect(c: ml_collections.ConfigDict, settings: Settings, workdir: str,
            progress: bool) -> list[label_lib.Pair]:
    """Stage 1: the real engine's results for `data.num_questions` questions, searched by the
    policy and/or as the question itself (`collect.query_sources`; appended to
    `collect.jsonl`, resumed), plus the pairs of `label.pairs`."""
    pairs: list[label_lib.Pair] = []
    collect_path = os.path.join(workdir, "collect.jsonl")
    if c.data.num_questions:
        questions = qa.sample(load_examples(c.data.train, c), c.data.num_questions, seed=c.seed)
        policy_config = policy_params = policy_tok = None  # the question alone needs no policy
        if "policy" in settings.collect.query_sources:
            policy_config, policy_params = models.load_pretrained(c.collect.policy,
                                                                  dtype=jnp.bfloat16)
            policy_tok = Tokenizer.from_pretrained(c.collect.policy)
        engine = make_engine(c.collect.engine, c, corpus=c.collect.corpus, url=c.collect.url,
                             topk=c.collect.depth, key="collect.engine")
        stats = collect_lib.run_collection(
            policy_config, policy_params, policy_tok, questions, engine, collect_path,
            settings.collect, rollout_config=settings.rollout, sampler=settings.sampler,
            progress=progress)
        engine.close()
        del policy_params
        logger.info("collection: %s", stats)
        pairs += label_lib.pairs_from_collection(read_jsonl(collect_path))
    if c.label.pairs:
        pairs += label_lib.load_pairs(c.label.pairs, on_error=c.label.on_error)
    return pairs


def label(c: ml_collections.ConfigDict, settings: Settings, pairs: list[label_lib.Pair],
          workdir: str) -> tuple[list[dict], list[dict]]:
    """Stage 2: the pairs labelled useful / noisy, balanced and split into training and
    held-out examples (`sft_train.jsonl`, `sft_heldout.jsonl`)."""
    judge = (label_lib.OpenAIJudge(c.label.judge_url, c.label.judge_model)
             if c.label.judge == "llm" else None)
    try:
        examples = label_lib.label_pairs(pairs, settings.label, judge)
    except ValueError as e:
        raise ConfigError(f"labelling {len(pairs)} pairs: {e}") from None
    train_ex, heldout = label_lib.split_heldout(examples, c.label.heldout_fraction, c.seed)
    write_jsonl_atomic(os.path.join(workdir, "sft_train.jsonl"), train_ex)
    write_jsonl_atomic(os.path.join(workdir, "sft_heldout.jsonl"), heldout)
    n_useful = sum(e["label"] == "useful" for e in train_ex)
    logger.info("labelled %d pairs -> %d training examples (%d useful, %d noisy), %d held out",
                len(pairs), len(train_ex), n_useful, len(train_ex) - n_useful, len(heldout))
    return train_ex, heldout


def finetune(c: ml_collections.ConfigDict, settings: Settings, train_ex: list[dict],
             workdir: str, hf_dir: str, progress: bool) -> None:
    """Stage 3: the simulator fine-tuned on the training examples (resumed from its
    checkpoints), exported to `hf_dir` in the compute dtype, and its loss curve plotted."""
    tokenizer = Tokenizer.from_pretrained(c.simulator)
    compute = jnp.dtype(c.finetune.compute_dtype)
    if not models.is_exported(hf_dir):
        config, params = models.load_pretrained(c.simulator, dtype=jnp.float32)
        params = finetune_lib.run_finetune(config, params, tokenizer, train_ex, workdir,
                                           settings.finetune, progress=progress)
        models.save_pretrained(config, jax.tree.map(lambda x: x.astype(compute), params),
                               hf_dir, tokenizer=tokenizer)
        del params
    if not os.path.exists(os.path.join(workdir, "plots")):
        plot_run(workdir)  # the loss curve


def report(c: ml_collections.ConfigDict, heldout: list[dict], hf_dir: str,
           workdir: str) -> None:
    """Stage 4: the quality report on held-out queries, the tuned simulator against the
    prompted base model and the real engine's pages (`report.md`, `report.json`)."""
    tokenizer = Tokenizer.from_pretrained(c.simulator)
    compute = jnp.dtype(c.finetune.compute_dtype)
    queries = report_lib.queries_for_report(heldout, c.report.num_queries, c.seed)
    if not queries:
        logger.warning("no held-out queries (label.heldout_fraction=%s): no quality report",
                       c.label.heldout_fraction)
        return
    topk = c.label.topk
    candidates = [("tuned", hf_dir, "finetuned", False)]
    if c.report.compare_base:
        candidates.append(("prompted base", c.simulator, "prompted", c.report.base_prime_reply))
    results = {"real engine (targets)": report_lib.summarize(
        report_lib.reference_rows(queries, topk))}
    samples = {}
    for name, path, variant, prime in candidates:
        config, params = models.load_pretrained(path, dtype=compute)
        engine = make_engine("simulator", c, topk=topk, model=(config, params, tokenizer),
                             simulator=ml_collections.ConfigDict(dict(
                                 variant=variant, temperature=c.report.temperature,
                                 max_new_tokens=c.report.max_new_tokens, prime_reply=prime,
                                 block_answer=c.report.block_answer)))
        rows = report_lib.evaluate_simulator(engine, queries, topk)
        results[name] = report_lib.summarize(rows)
        samples[name] = rows[:2] + rows[len(queries):len(queries) + 2]
        del params
    table = report_lib.write_report(results, workdir)
    write_jsonl_atomic(os.path.join(workdir, "report_samples.jsonl"),
                       [{"simulator": k, **r} for k, v in samples.items() for r in v])
    print(table)


def _command(c: ml_collections.ConfigDict, workdir: str) -> int:
    print(json.dumps({"simulator": run(c, workdir)}))
    return 0


def main(argv=None):
    run_command(_command, "simulator_sft.py", "output directory (re-running resumes)",
                errors=(ConfigError,), argv=argv)
