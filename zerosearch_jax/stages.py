"""The stages a training run runs before RL, each cached in its own directory of the run.

    warmup/          the format warm-up: behaviour cloning on demonstration episodes
    simulator_sft/   simulator tuning: the `zerosearch_jax.simulator_sft` pipeline

A stage's complete Hugging Face export (`<stage>/hf`, `models.is_exported`) is its cache: a
re-run reuses it, and a stage killed part-way resumes from its own checkpoints. Once the export
is written those checkpoints are removed (they hold the tuned weights again, with the optimizer
moments: ~1.4 GB a step for SmolLM2-135M, more than half of the default run's disk), unless
`checkpoint.keep_stage_checkpoints`. A stage runs
on one host; a multi-host run must be given the exports (the error says how). `stages_dir`
(config) points every run of a sweep at one finished run's stages: they are read there, never
run there (points running side by side would race to write them).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from zerosearch_jax import agent, checkpoints, metrics, models, search
from zerosearch_jax.data import qa, synthetic
from zerosearch_jax.inputs import ConfigError, load_examples
from zerosearch_jax.simulator_sft import finetune, pipeline
from zerosearch_jax.tokenizer import Tokenizer

logger = logging.getLogger("zerosearch_jax.stages")


def stage_root(c: ml_collections.ConfigDict, workdir: str) -> str:
    """Where a run's stages are cached: `stages_dir` when set (shared, read only), else the
    run's own workdir."""
    return c.get("stages_dir") or workdir


def cached(c: ml_collections.ConfigDict, workdir: str, name: str, what: str,
           single_host: str) -> tuple[str, str, bool]:
    """(directory, its hf/ export, whether that export is complete) of the stage cached in
    `<stage_root>/<name>`. A stage still to run refuses several processes (it runs on one host)
    with the `single_host` message, and a shared `stages_dir` that lacks it."""
    root = stage_root(c, workdir)
    stage_dir = os.path.join(root, name)
    hf_dir = os.path.join(stage_dir, "hf")
    if models.is_exported(hf_dir):
        logger.info("using %s in %s", what, hf_dir)
        return stage_dir, hf_dir, True
    if c.get("stages_dir"):
        raise ConfigError(
            f"config.stages_dir = {root!r}: no {what} in {hf_dir}; finish a run there first "
            f"(python -m zerosearch_jax.train --config=<the same config> --workdir={root}), "
            "or leave stages_dir empty to run the stage in this run's workdir")
    if jax.process_count() > 1:
        raise ConfigError(single_host)
    return stage_dir, hf_dir, False


def tune_simulator(c: ml_collections.ConfigDict, workdir: str,
                   collect_policy: str | None = None) -> str:
    """The simulator-tuning pipeline (`zerosearch_jax.simulator_sft`) as a stage before RL,
    on `simulator.model` with the `simulator.sft` settings, in `<workdir>/simulator_sft`.
    collect_policy: the policy that searches during collection when `simulator.sft.collect.
    policy` is the run's own policy (the warmed-up one, which issues real queries). Returns the
    tuned model's directory.
    """
    sft_dir, hf_dir, done = cached(
        c, workdir, "simulator_sft", "the tuned simulator", "config.simulator.tune runs on one "
        "host: tune first with `python -m zerosearch_jax.simulator_sft`, then set "
        "simulator.model to its hf/ directory and simulator.tune=False")
    if done:
        return hf_dir
    logger.info("tuning the simulator (%s) in %s", c.simulator.model, sft_dir)
    sft = c.simulator.sft
    with sft.unlocked():
        sft.simulator = c.simulator.model
        if collect_policy and sft.collect.policy == c.policy:
            sft.collect.policy = collect_policy
    hf_dir = pipeline.run(sft, sft_dir)
    finished(c, sft_dir, hf_dir)
    return hf_dir


def finished(c: ml_collections.ConfigDict, stage_dir: str, hf_dir: str) -> None:
    """Removes a finished stage's checkpoints once its export is complete (a re-run reads the
    export, never them), unless `checkpoint.keep_stage_checkpoints`."""
    path = os.path.join(stage_dir, "checkpoints")
    if (c.checkpoint.get("keep_stage_checkpoints", False) or not models.is_exported(hf_dir)
            or not os.path.isdir(path)):
        return
    size = checkpoints.directory_bytes(path)
    shutil.rmtree(path)
    logger.info("removed the finished stage's checkpoints (%.2f GB) in %s: its export %s is "
                "what later runs read (checkpoint.keep_stage_checkpoints=True keeps them)",
                size / 1e9, path, hf_dir)


ValidateFn = Callable[[models.ModelConfig, dict], dict[str, float]]


def warm_up_policy(c: ml_collections.ConfigDict, workdir: str,
                   rollout_config: agent.RolloutConfig, tokenizer: Tokenizer,
                   engine: search.SearchEngine, validate_fn: ValidateFn | None = None) -> str:
    """The format warm-up (`agent.warmup`) as the stage before RL: behaviour cloning of the
    policy on demonstration episodes built with the validation engine from `warmup.
    num_questions` training questions, in `<workdir>/warmup`. Returns the warmed-up policy's
    directory, which RL starts from and which is its frozen reference.

    validate_fn(model_config, params) -> metrics: scores the untrained policy first, written
    to `warmup/validation_before.json` (the run's step-0 validation is the warmed-up one)."""
    stage_dir, hf_dir, done = cached(
        c, workdir, "warmup", "the warmed-up policy", "config.warmup runs on one host: warm up "
        "on one host first, then set policy to its warmup/hf directory and warmup.steps=0")
    if done:
        return hf_dir
    t0 = time.perf_counter()
    data, counts = demonstrations(c, rollout_config, tokenizer, engine)
    logger.info("format warm-up of %s on %d demonstrations (%s) in %s", c.policy,
                len(data["tokens"]), counts, stage_dir)
    w = c.warmup
    sc = finetune.SFTConfig(steps=w.steps, batch_size=w.batch_size, lr=w.lr,
                            max_length=data["tokens"].shape[1], weight_decay=0.01,
                            compute_dtype=c.compute_dtype, remat=c.remat,
                            checkpoint_every=w.steps, keep=1, seed=c.seed,
                            pack_length=w.pack_length, micro_batch_size=w.micro_batch_size)
    model_config, params = models.load_pretrained(c.policy, dtype=jnp.float32)
    before_path = os.path.join(stage_dir, "validation_before.json")
    if validate_fn is not None and not os.path.exists(before_path):
        before = validate_fn(model_config, params)
        logger.info("validation of the untrained policy: %s", metrics.summary(before))
        os.makedirs(stage_dir, exist_ok=True)
        with open(before_path, "w") as f:
            json.dump(before, f, indent=2)
    params = finetune.tune_on_arrays(model_config, params, data, stage_dir, sc,
                                     desc="format warm-up")
    # The master weights as they are: RL continues from them.
    models.save_pretrained(model_config, params, hf_dir, tokenizer=tokenizer)
    with open(os.path.join(stage_dir, "demonstrations.json"), "w") as f:
        json.dump({**counts, "seconds": time.perf_counter() - t0,
                   "tokens_per_row": sc.pack_length or sc.max_length,
                   "packed": bool(sc.pack_length)}, f, indent=2)
    finished(c, stage_dir, hf_dir)
    return hf_dir


def demonstrations(c: ml_collections.ConfigDict, rollout_config: agent.RolloutConfig,
                    tokenizer: Tokenizer, engine: search.SearchEngine) -> tuple[dict, dict]:
    """The warm-up's encoded demonstration episodes (`agent.warmup.encode_demonstrations`'s
    arrays) and the counts of kept and dropped questions."""
    questions = qa.sample(load_examples(c.data.train, c, tokenizer, rollout_config,
                                        "data.train"), c.warmup.num_questions, seed=c.seed,
                           stratify=c.warmup.get("stratify", False))
    plan = agent.warmup.question_queries
    if c.data.train.startswith("synthetic:"):
        plan = agent.warmup.synthetic_world_queries(
            synthetic.build_world(synthetic.WorldConfig(seed=c.data.synthetic_seed)),
            reread_single_hop=c.warmup.get("reread_single_hop", 0.0))
    demos, counts = agent.warmup.build_demonstrations(
        questions, engine, max_turns=rollout_config.max_turns, plan=plan,
        visible=agent.warmup.visible_documents(tokenizer, rollout_config.max_obs_tokens))
    if not demos:
        raise ConfigError(f"config.warmup: no demonstration kept of {counts['examples']} "
                          f"questions ({counts}); the engine's documents never contained a "
                          "gold answer")
    return agent.warmup.encode_demonstrations(tokenizer, demos, rollout_config), counts
