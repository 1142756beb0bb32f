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
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections

from zerosearch_jax import agent, models, sampling, search
from zerosearch_jax.cli import setup_logging
from zerosearch_jax.data import qa
from zerosearch_jax.data.jsonl import read_jsonl, write_jsonl_atomic
from zerosearch_jax.inputs import ConfigError, load_examples, make_real_engine
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
    def wrap(key, fn):
        try:
            return fn()
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{prefix}{key}: {e}") from None

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
    cc = wrap("collect", lambda: collect_lib.CollectConfig(
        batch_size=c.collect.batch_size, query_sources=sources, max_calls=c.collect.max_calls,
        seed=c.seed))
    rc = wrap("collect", lambda: agent.RolloutConfig(
        samples_per_prompt=1, max_turns=c.collect.max_turns,
        max_new_tokens=c.collect.max_new_tokens, max_obs_tokens=c.collect.max_obs_tokens))
    sampler = wrap("collect", lambda: sampling.TopP(c.collect.top_p,
                                                    temperature=c.collect.temperature))
    lc = wrap("label", lambda: label_lib.LabelConfig(
        judge=c.label.judge, topk=c.label.topk, doc_words=c.label.doc_words,
        balance=c.label.balance, seed=c.seed))
    f = c.finetune
    sc = wrap("finetune", lambda: finetune_lib.SFTConfig(
        steps=f.steps, batch_size=f.batch_size, max_length=f.max_length, lr=f.lr,
        warmup_ratio=f.warmup_ratio, weight_decay=f.weight_decay, grad_clip=f.grad_clip,
        compute_dtype=f.compute_dtype, remat=f.remat, checkpoint_every=f.checkpoint_every,
        keep=f.keep, seed=c.seed))
    if c.report.num_queries < 0 or c.report.max_new_tokens < 1:
        raise ConfigError(f"{prefix}report: num_queries must be >= 0 and max_new_tokens >= 1")
    return Settings(cc, rc, sampler, lc, sc)


def is_exported(hf_dir: str) -> bool:
    """save_pretrained renames its files into place last, so config.json plus weights mean a
    complete export."""
    return os.path.exists(os.path.join(hf_dir, "config.json")) and any(
        name.endswith(".safetensors") for name in os.listdir(hf_dir))


def run(c: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> str:
    """Runs (or finishes) every stage; returns the tuned simulator's HF directory."""
    settings = build_settings(c)
    # The models exist before collection spends time (or paid search calls).
    for key in ("simulator", "collect.policy"):
        name = c.simulator if key == "simulator" else c.collect.policy
        if key == "collect.policy" and not c.data.num_questions:
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

    # -- 1. collection --------------------------------------------------------------------------
    t0 = time.perf_counter()
    pairs: list[label_lib.Pair] = []
    collect_path = os.path.join(workdir, "collect.jsonl")
    if c.data.num_questions:
        questions = qa.sample(load_examples(c.data.train, c), c.data.num_questions, seed=c.seed)
        policy_config, policy_params = models.load_pretrained(c.collect.policy,
                                                              dtype=jnp.bfloat16)
        policy_tok = Tokenizer.from_pretrained(c.collect.policy)
        engine = make_real_engine(c.collect.engine, c, corpus=c.collect.corpus,
                                  url=c.collect.url, topk=c.collect.depth)
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
    timings["collect_s"] = time.perf_counter() - t0

    # -- 2. labelling -----------------------------------------------------------------------------
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

    # -- 3. fine-tuning -------------------------------------------------------------------------
    t0 = time.perf_counter()
    tokenizer = Tokenizer.from_pretrained(c.simulator)
    compute = jnp.dtype(c.finetune.compute_dtype)
    if not is_exported(hf_dir):
        config, params = models.load_pretrained(c.simulator, dtype=jnp.float32)
        params = finetune_lib.run_finetune(config, params, tokenizer, train_ex, workdir,
                                       settings.finetune, progress=progress)
        models.save_pretrained(config, jax.tree.map(lambda x: x.astype(compute), params),
                               hf_dir, tokenizer=tokenizer)
        del params
    if not os.path.exists(os.path.join(workdir, "plots")):
        from zerosearch_jax.plot import plot_run

        plot_run(workdir)  # the loss curve
    timings["finetune_s"] = time.perf_counter() - t0

    # -- 4. quality report ----------------------------------------------------------------------
    t0 = time.perf_counter()
    if c.report.num_queries and not os.path.exists(os.path.join(workdir, "report.json")):
        queries = report_lib.queries_for_report(heldout, c.report.num_queries, c.seed)
        if not queries:
            logger.warning("no held-out queries (label.heldout_fraction=%s): no quality report",
                           c.label.heldout_fraction)
        else:
            topk = c.label.topk
            candidates = [("tuned", hf_dir, "finetuned", False)]
            if c.report.compare_base:
                candidates.append(("prompted base", c.simulator, "prompted",
                                   c.report.base_prime_reply))
            results = {"real engine (targets)": report_lib.summarize(
                report_lib.reference_rows(queries, topk))}
            samples = {}
            for name, path, variant, prime in candidates:
                config, params = models.load_pretrained(path, dtype=compute)
                engine = search.LLMSimulator(
                    config, params, tokenizer, variant=variant, topk=topk,
                    temperature=c.report.temperature, max_new_tokens=c.report.max_new_tokens,
                    prime_reply=prime, seed=c.seed)
                rows = report_lib.evaluate_simulator(engine, queries, topk)
                results[name] = report_lib.summarize(rows)
                samples[name] = rows[:2] + rows[len(queries):len(queries) + 2]
                del params
            table = report_lib.write_report(results, workdir)
            write_jsonl_atomic(os.path.join(workdir, "report_samples.jsonl"),
                               [{"simulator": k, **r} for k, v in samples.items() for r in v])
            print(table)
    timings["report_s"] = time.perf_counter() - t0
    logger.info("simulator tuning done: %s; timings %s", hf_dir,
                {k: round(v, 1) for k, v in timings.items()})
    return hf_dir


def main(argv=None):
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__)))), "configs", "simulator_sft.py"),
        "ml_collections config file", lock_config=True)
    workdir_flag = flags.DEFINE_string("workdir", None, "output directory (re-running resumes)",
                                       required=True)

    def _run(_):
        setup_logging()
        try:
            hf_dir = run(config_flag.value, workdir_flag.value)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps({"simulator": hf_dir}))
        return 0

    app.run(lambda a: sys.exit(_run(a)), argv=argv)
