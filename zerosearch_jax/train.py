"""ZeroSearch RL training: rollouts against a simulated search engine, then a policy update.

    python -m zerosearch_jax.train --config=configs/default.py --workdir=runs/default \\
        [--config.total_steps=32] [--config.algorithm.estimator=reinforce] ...

Each step: take `prompts_per_step` questions (shuffled, epoch-aware, from the seed), set the
curriculum's noise probability on the simulator, roll out `samples_per_prompt` episodes per
question, score them (old / reference log-probs, values, advantages) and update. Every
`validation.every` steps the policy is evaluated greedily with a real engine. Metrics go to
`<workdir>/metrics.jsonl` and TensorBoard; plots to `<workdir>/plots/`; checkpoints (orbax) to
`<workdir>/checkpoints/`: every `checkpoint.every` steps, at the end and on SIGTERM, and a run
started with the same workdir resumes from the latest one. The final policy is exported as a
Hugging Face directory, `<workdir>/hf_policy`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from zerosearch_jax import agent, checkpoints, curriculum, models, sampling, search, sharding
from zerosearch_jax.cli import setup_logging
from zerosearch_jax.data import qa, synthetic
from zerosearch_jax.data.iterator import DataIterator
from zerosearch_jax.inputs import (  # noqa: F401 (re-exported: the trainer's API)
    ConfigError,
    admissible,
    check_models,
    load_examples,
    make_real_engine,
    make_validation_engine,
    world_passages,
)
from zerosearch_jax.rl import algorithms as algo
from zerosearch_jax.rl import packing
from zerosearch_jax.rl import train_step as ts
from zerosearch_jax.tokenizer import Tokenizer

logger = logging.getLogger("zerosearch_jax.train")


# ----------------------------------------------------------------------------------------------
# Config -> typed settings (every check happens here, before any work).
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    rollout: agent.RolloutConfig
    update: ts.UpdateConfig
    sampler: Any
    schedule: Any
    mesh_shape: tuple[int, int, int]
    axis_rules: tuple = sharding.DEFAULT_RULES
    simulator_devices: int = 0
    simulator_mesh_shape: tuple[int, int, int] = (-1, 1, 1)


# rollout.engine: `in_graph` runs each rollout as one program (agent/episode.py; the in-process
# simulator sharing the policy's tokenizer), `host` the text-level host loop (agent/rollout.py;
# every engine), `auto` the first when the engine allows it.
ROLLOUT_ENGINES = ("auto", "in_graph", "host")


def _check(condition: bool, key: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"config.{key} = {value!r}: expected {expected}")


def build_settings(c: ml_collections.ConfigDict) -> Settings:
    """Validates the config and builds the frozen dataclasses the run uses."""
    _check(c.total_steps >= 1, "total_steps", c.total_steps, "an integer >= 1")
    _check(c.prompts_per_step >= 1, "prompts_per_step", c.prompts_per_step, ">= 1")
    _check(c.param_dtype in ("float32", "bfloat16"), "param_dtype", c.param_dtype,
           "float32 or bfloat16")
    _check(c.compute_dtype in ("float32", "bfloat16"), "compute_dtype", c.compute_dtype,
           "float32 or bfloat16")
    _check(c.simulator.kind in ("llm", "server", "bm25", "searchr1"), "simulator.kind",
           c.simulator.kind, "llm, server, bm25 or searchr1")
    _check(c.validation.engine in ("bm25", "searchr1", "serpapi"), "validation.engine",
           c.validation.engine, "bm25, searchr1 or serpapi")
    _check(c.validation.every >= 1, "validation.every", c.validation.every, ">= 1")
    _check(c.validation.topk >= 1, "validation.topk", c.validation.topk, ">= 1")
    _check(c.data.validation_size >= 1, "data.validation_size", c.data.validation_size, ">= 1")
    _check(c.validation.engine != "searchr1" or bool(c.validation.url), "validation.url",
           c.validation.url, "the retriever's URL with validation.engine = searchr1")
    _check(c.simulator.kind not in ("server", "searchr1") or bool(c.simulator.url),
           "simulator.url", c.simulator.url, f"the endpoint with simulator.kind = "
           f"{c.simulator.kind}")
    _check(c.simulator.variant in search.simulator.SIMULATOR_VARIANTS, "simulator.variant",
           c.simulator.variant, " or ".join(search.simulator.SIMULATOR_VARIANTS))
    for key in ("b1", "b2"):
        _check(0 <= c.optim[key] < 1, f"optim.{key}", c.optim[key], "in [0, 1)")
    _check(c.optim.weight_decay >= 0, "optim.weight_decay", c.optim.weight_decay, ">= 0")
    _check(c.optim.grad_clip > 0, "optim.grad_clip", c.optim.grad_clip, "> 0")
    _check(c.checkpoint.every >= 1, "checkpoint.every", c.checkpoint.every, ">= 1")
    _check(c.checkpoint.keep >= 1, "checkpoint.keep", c.checkpoint.keep, ">= 1")
    _check(c.data.on_error in ("raise", "skip"), "data.on_error", c.data.on_error,
           "raise or skip")
    for key in ("shape", "simulator_shape"):
        shape = tuple(c.mesh[key])
        _check(len(shape) == 3 and shape.count(-1) <= 1 and all(
            isinstance(x, int) and (x >= 1 or x == -1) for x in shape), f"mesh.{key}", shape,
            "(data, fsdp, tensor) sizes >= 1, with at most one -1 (inferred)")
    try:
        axis_rules = sharding.check_rules(c.mesh.axis_rules)
    except ValueError as e:
        raise ConfigError(f"config.mesh.axis_rules: {e}") from None
    if c.simulator.kind == "llm" and c.simulator.get("tune"):
        from zerosearch_jax.simulator_sft import pipeline

        pipeline.build_settings(c.simulator.sft, prefix="config.simulator.sft.")
    _check(c.max_nonfinite_steps >= 1, "max_nonfinite_steps", c.max_nonfinite_steps,
           "an integer >= 1 (consecutive skipped updates before the run stops)")
    if c.simulator.kind in ("llm", "server"):
        _check(c.simulator.max_new_tokens >= 1, "simulator.max_new_tokens",
               c.simulator.max_new_tokens, ">= 1")
        _check(c.simulator.temperature > 0, "simulator.temperature", c.simulator.temperature,
               "> 0")
        _check(c.simulator.topk >= 1, "simulator.topk", c.simulator.topk, ">= 1")
    _check(c.mesh.simulator_devices >= 0, "mesh.simulator_devices", c.mesh.simulator_devices,
           ">= 0 (0: the simulator shares the training devices)")
    _check(c.mesh.simulator_devices == 0 or c.simulator.kind == "llm", "mesh.simulator_devices",
           c.mesh.simulator_devices, f"0 with simulator.kind={c.simulator.kind!r} (a sub-mesh "
           "is for the in-process llm simulator)")
    try:
        schedule = curriculum.get_schedule(c.curriculum.schedule)
        if c.curriculum.schedule == "exponential":  # the only schedule with a base
            schedule = functools.partial(schedule, base=c.curriculum.base)
        schedule(1, c.total_steps, c.curriculum.start, c.curriculum.end)
    except ValueError as e:
        raise ConfigError(f"config.curriculum: {e}") from None
    r = c.rollout
    engine_mode = r.get("engine", "auto")
    _check(engine_mode in ROLLOUT_ENGINES, "rollout.engine", engine_mode,
           " | ".join(ROLLOUT_ENGINES))
    _check(engine_mode != "in_graph" or c.simulator.kind == "llm", "rollout.engine",
           engine_mode, f"auto or host with simulator.kind={c.simulator.kind!r} (the in-graph "
           "rollout runs the in-process llm simulator)")
    try:
        rollout = agent.RolloutConfig(
            samples_per_prompt=r.samples_per_prompt, max_turns=r.max_turns,
            max_new_tokens=r.max_new_tokens, max_obs_tokens=r.max_obs_tokens,
            max_prompt_tokens=r.max_prompt_tokens, max_context_tokens=r.max_context_tokens)
        sampler = sampling.TopP(r.top_p, temperature=r.temperature)
    except ValueError as e:
        raise ConfigError(f"config.rollout: {e}") from None
    a = c.algorithm
    try:
        loss = algo.LossConfig(
            clip_low=a.clip_low, clip_high=a.clip_high, entropy_coef=a.entropy_coef,
            kl_coef=a.kl_coef, kl_estimator=a.kl_estimator, use_kl_loss=a.use_kl_loss,
            upstream_kl_sign=a.upstream_kl_sign, value_clip=a.value_clip)
        adv = algo.AdvantageConfig(gamma=a.gamma, lam=a.lam, kl_coef=a.kl_coef)
        update = ts.UpdateConfig(
            advantage_estimator=a.estimator, ppo_epochs=a.ppo_epochs,
            num_minibatches=a.num_minibatches, micro_batch_size=a.micro_batch_size,
            pack_length=a.pack_length, loss=loss,
            advantage=adv, kl_in_reward=a.kl_in_reward, remat=c.remat,
            compute_dtype=c.compute_dtype, temperature=r.temperature)
        update.check_batch_size(c.prompts_per_step * r.samples_per_prompt)
    except ValueError as e:
        raise ConfigError(f"config.algorithm: {e}") from None
    longest = rollout.max_prompt_tokens + rollout.max_response_tokens
    _check(a.pack_length == 0 or a.pack_length >= longest, "algorithm.pack_length",
           a.pack_length, f"0 (no packing) or >= the longest possible episode, {longest} tokens "
           "(rollout.max_prompt_tokens + the response's turns and observations)")
    w = c.warmup
    _check(w.steps >= 0, "warmup.steps", w.steps, ">= 0 (0: no format warm-up)")
    if w.steps:
        _check(w.num_questions >= 1, "warmup.num_questions", w.num_questions, ">= 1")
        _check(w.batch_size >= 1, "warmup.batch_size", w.batch_size, ">= 1")
        _check(w.lr > 0, "warmup.lr", w.lr, "> 0")
        _check(rollout.max_turns >= 1, "rollout.max_turns", rollout.max_turns,
               ">= 1 with warmup.steps > 0 (demonstrations search at least once)")
    for key in ("lr", "critic_lr"):
        _check(c.optim[key] > 0, f"optim.{key}", c.optim[key], "> 0")
    for key in ("warmup_ratio", "critic_warmup_ratio"):
        _check(0 <= c.optim[key] <= 1, f"optim.{key}", c.optim[key], "in [0, 1]")
    return Settings(rollout, update, sampler, schedule, tuple(int(x) for x in c.mesh.shape),
                    axis_rules, int(c.mesh.simulator_devices),
                    tuple(int(x) for x in c.mesh.simulator_shape))


def make_meshes(settings: Settings, batch_size: int) -> sharding.Meshes:
    """The run's placements on the devices there are (every process's): checks what needs the
    device count, naming the config key."""
    try:
        meshes = sharding.make_meshes(settings.mesh_shape, settings.axis_rules,
                                      settings.simulator_devices, settings.simulator_mesh_shape)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None
    shards = meshes.train.batch_shards
    _check(batch_size % shards == 0, "prompts_per_step", batch_size // settings.rollout
           .samples_per_prompt, f"prompts_per_step x rollout.samples_per_prompt = {batch_size} "
           f"rows to be a multiple of the {shards} batch shards of mesh "
           f"{dict(meshes.train.mesh.shape)}")
    try:
        start, stop = meshes.train.process_rows(batch_size)
    except ValueError as e:
        raise ConfigError(f"config.mesh.axis_rules: {e}") from None
    n = settings.rollout.samples_per_prompt
    _check(start % n == 0 and stop % n == 0, "prompts_per_step", batch_size // n,
           f"a multiple of the {jax.process_count()} processes (each rolls out whole questions)")
    return meshes


# ----------------------------------------------------------------------------------------------
# Data and engines.
# ----------------------------------------------------------------------------------------------


def _stage(workdir: str, name: str, what: str, single_host: str) -> tuple[str, str, bool]:
    """(directory, its hf/ export, whether that export is complete) of a stage that runs
    before RL and is cached in `<workdir>/<name>`. A stage still to run refuses several
    processes (it runs on one host) with the `single_host` message."""
    from zerosearch_jax.simulator_sft import pipeline

    stage_dir = os.path.join(workdir, name)
    hf_dir = os.path.join(stage_dir, "hf")
    if pipeline.is_exported(hf_dir):
        logger.info("using %s in %s", what, hf_dir)
        return stage_dir, hf_dir, True
    if jax.process_count() > 1:
        raise ConfigError(single_host)
    return stage_dir, hf_dir, False


def tune_simulator(c: ml_collections.ConfigDict, workdir: str,
                   collect_policy: str | None = None) -> str:
    """The simulator-tuning pipeline (`zerosearch_jax.simulator_sft`) as a stage before RL,
    on `simulator.model` with the `simulator.sft` settings, in `<workdir>/simulator_sft`; a
    finished stage is reused (its HF export is the cache). collect_policy: the policy that
    searches during collection when `simulator.sft.collect.policy` is the run's own policy
    (the warmed-up one, which issues real queries). Returns the tuned model's directory.
    """
    from zerosearch_jax.simulator_sft import pipeline

    sft_dir, hf_dir, done = _stage(
        workdir, "simulator_sft", "the tuned simulator", "config.simulator.tune runs on one "
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
    return pipeline.run(sft, sft_dir)


def warm_up_policy(c: ml_collections.ConfigDict, workdir: str, settings: Settings,
                   tokenizer: Tokenizer, engine: search.SearchEngine,
                   validate_fn=None) -> str:
    """The format warm-up (`agent.warmup`) as the stage before RL: behaviour cloning of the
    policy on demonstration episodes built with the validation engine from `warmup.
    num_questions` training questions, in `<workdir>/warmup`; a finished stage is reused (its
    HF export is the cache). Returns the warmed-up policy's directory, which RL starts from
    and which is its frozen reference.

    validate_fn(model_config, params) -> metrics: scores the untrained policy first, written
    to `warmup/validation_before.json` (the run's step-0 validation is the warmed-up one)."""
    from zerosearch_jax.simulator_sft import finetune

    w = c.warmup
    stage_dir, hf_dir, done = _stage(
        workdir, "warmup", "the warmed-up policy", "config.warmup runs on one host: warm up "
        "on one host first, then set policy to its warmup/hf directory and warmup.steps=0")
    if done:
        return hf_dir
    t0 = time.perf_counter()
    questions = qa.sample(load_examples(c.data.train, c, tokenizer, settings.rollout,
                                        "data.train"), w.num_questions, seed=c.seed)
    plan = agent.warmup.question_queries
    if c.data.train.startswith("synthetic:"):
        plan = agent.warmup.synthetic_world_queries(
            synthetic.build_world(synthetic.WorldConfig(seed=c.data.synthetic_seed)))
    demos, counts = agent.warmup.build_demonstrations(
        questions, engine, max_turns=settings.rollout.max_turns, plan=plan,
        visible=agent.warmup.visible_documents(tokenizer, settings.rollout.max_obs_tokens))
    logger.info("format warm-up of %s on %d demonstrations (%s) in %s", c.policy,
                len(demos), counts, stage_dir)
    if not demos:
        raise ConfigError(f"config.warmup: no demonstration kept of {counts['examples']} "
                          f"questions ({counts}); the engine's documents never contained a "
                          "gold answer")
    data = agent.warmup.encode_demonstrations(tokenizer, demos, settings.rollout)
    sc = finetune.SFTConfig(steps=w.steps, batch_size=w.batch_size, lr=w.lr,
                            max_length=data["tokens"].shape[1], weight_decay=0.01,
                            compute_dtype=c.compute_dtype, remat=c.remat,
                            checkpoint_every=w.steps, keep=1, seed=c.seed)
    model_config, params = models.load_pretrained(c.policy, dtype=jnp.float32)
    before_path = os.path.join(stage_dir, "validation_before.json")
    if validate_fn is not None and not os.path.exists(before_path):
        before = validate_fn(model_config, params)
        logger.info("validation of the untrained policy: %s", _fmt(before))
        os.makedirs(stage_dir, exist_ok=True)
        with open(before_path, "w") as f:
            json.dump(before, f, indent=2)
    params = finetune.tune_on_arrays(model_config, params, data, stage_dir, sc,
                                     desc="format warm-up")
    # The master weights as they are: RL continues from them.
    models.save_pretrained(model_config, params, hf_dir, tokenizer=tokenizer)
    with open(os.path.join(stage_dir, "demonstrations.json"), "w") as f:
        json.dump({**counts, "seconds": time.perf_counter() - t0,
                   "tokens_per_row": int(data["tokens"].shape[1])}, f, indent=2)
    return hf_dir


def _rollout_engine(c: ml_collections.ConfigDict, engine, tokenizer: Tokenizer, placement,
                    examples):
    """The rollout function of `rollout.engine` (`agent.rollout`'s signature)."""
    mode = c.rollout.get("engine", "auto")
    why_not = agent.episode.supports(engine, tokenizer, placement)
    if mode == "in_graph" and why_not:
        raise ConfigError(f"config.rollout.engine = 'in_graph': {why_not}")
    if mode == "host" or why_not:
        if mode == "auto":
            logger.info("rollout: the host loop (%s)", why_not)
        return agent.rollout
    # Fixed simulator-prompt widths for the whole run: every step runs the same program.
    widths = agent.episode.field_lengths(tokenizer, examples, engine.prompt)
    logger.info("rollout: one program per rollout (policy and simulator in graph; question "
                "and answer widths %s)", widths)
    return functools.partial(agent.episode.rollout, field_widths=widths)


def make_training_engine(c: ml_collections.ConfigDict, policy: tuple, tokenizer: Tokenizer,
                         model: str | None = None):
    """The engine the policy trains against. model: overrides `simulator.model` (the tuned
    simulator's directory)."""
    s = c.simulator
    if s.kind == "llm":
        model = model or s.model
        if model == c.policy:  # the same (frozen, compute-dtype) weights as the reference
            config, params = policy
        else:
            config, params = models.load_pretrained(model, dtype=jnp.dtype(c.compute_dtype))
            tokenizer = Tokenizer.from_pretrained(model)
        # One compiled generation program for every call: a turn searches with at most every
        # row of the rollout.
        rows = c.prompts_per_step * c.rollout.samples_per_prompt // jax.process_count()
        return search.LLMSimulator(
            config, params, tokenizer, variant=s.variant, topk=s.topk,
            temperature=s.temperature, max_new_tokens=s.max_new_tokens,
            prime_reply=s.prime_reply, seed=c.seed, batch_size=rows)
    if s.kind == "server":
        return search.SimulatorServerClient(s.url, model=s.model, variant=s.variant, topk=s.topk,
                                            temperature=s.temperature,
                                            max_new_tokens=s.max_new_tokens, seed=c.seed)
    if s.kind == "searchr1":  # Search-R1 style: train with a real engine.
        return search.SearchR1RetrieverClient(s.url, topk=c.validation.topk)
    return search.BM25SearchEngine.build(world_passages(c), topk=c.validation.topk)


# ----------------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------------


def validate(config, params, tokenizer, examples, engine, settings: Settings, seed: int,
             placement: sharding.Placement | None = None):
    """Greedy episodes on the validation questions: EM / cover EM / F1, overall and per source.

    With several processes each one rolls out every process_count-th question (params on its
    `placement`) and the per-question scores are gathered, so all return the same numbers.
    """
    rc = dataclasses.replace(settings.rollout, samples_per_prompt=1)
    n_proc, me = jax.process_count(), jax.process_index()
    mine = examples[me::n_proc]
    _, stats = agent.rollout(config, params, tokenizer, mine, engine, rollout_config=rc,
                             sampler=sampling.Greedy(), rng=seed, placement=placement)
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
    sources = np.array([e.data_source for e in examples])
    for src in sorted(set(sources)):
        sel = sources == src
        out[f"{src}/f1"] = float(f1[sel].mean())
        out[f"{src}/cover_em"] = float(cover_em[sel].mean())
    return out


# ----------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------


class _Preempted:
    """SIGTERM (TPU preemption) sets a flag; the loop checkpoints and exits at the step end."""

    def __init__(self):
        self.flag = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logger.warning("SIGTERM received: saving a checkpoint after this step")
        self.flag = True


def _batch_dict(batch: agent.RolloutBatch) -> dict[str, np.ndarray]:
    return {k: np.asarray(getattr(batch, k)) for k in
            ("tokens", "attention_mask", "positions", "loss_mask", "logprobs", "rewards",
             "group")}


_RESPONSE_BUCKET = 128


def _trim_response(batch: agent.RolloutBatch, max_response: int) -> agent.RolloutBatch:
    """The batch cut after the longest response of the step (over every process), rounded up
    to `_RESPONSE_BUCKET` tokens (at most `max_response`). Responses are right-padded, so only
    padding goes: an update over a [B, P + R] batch of mostly short episodes would otherwise
    pay for the longest possible one on every row."""
    P = batch.prompt_length
    longest = int(batch.attention_mask[:, P:].sum(axis=1).max(initial=0))
    longest = int(sharding.allgather(np.array(longest)).max())
    R = min(max_response, max(1, -(-longest // _RESPONSE_BUCKET)) * _RESPONSE_BUCKET)
    cut = lambda x: x[:, :P + R]  # noqa: E731
    return batch.replace(tokens=cut(batch.tokens), attention_mask=cut(batch.attention_mask),
                         positions=cut(batch.positions), loss_mask=cut(batch.loss_mask),
                         logprobs=cut(batch.logprobs), rewards=cut(batch.rewards))


def _across_processes(local: dict[str, float]) -> dict[str, float]:
    """Every process's step metrics reduced to the same numbers on each: the mean of the
    per-process means (every process rolls out as many episodes) and the slowest process's
    `time/*`."""
    keys = sorted(local)
    rows = sharding.allgather(np.array([local[k] for k in keys], np.float64))
    return {k: float(rows[:, i].max() if k.startswith("time/") else rows[:, i].mean())
            for i, k in enumerate(keys)}


def train(c: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Runs (or resumes) training; returns the final validation metrics."""
    settings = build_settings(c)  # every config check, before any work

    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from zerosearch_jax.metrics import MetricsWriter
    from zerosearch_jax.plot import plot_run

    rc = settings.rollout
    batch_size = c.prompts_per_step * rc.samples_per_prompt
    meshes = make_meshes(settings, batch_size)  # the checks that need the device count
    _check(c.data.validation_size >= jax.process_count(), "data.validation_size",
           c.data.validation_size, f">= the {jax.process_count()} processes")
    # This process rolls out the questions whose rows its training devices hold (all of them
    # in a single process), so its rows become its part of the global batch as they are.
    row_start, row_stop = meshes.train.process_rows(batch_size)
    first_question = row_start // rc.samples_per_prompt
    my_questions = slice(first_question, row_stop // rc.samples_per_prompt)

    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(c.to_json_best_effort(indent=2))
        logger.info("%s", describe_run(c, workdir))
    times = {"start": time.perf_counter()}

    # -- models ---------------------------------------------------------------------------------
    # Master weights (and Adam moments) in param_dtype; rollouts, the frozen reference and the
    # simulator hold compute_dtype copies (a cast per step is far cheaper than casting every
    # weight at every decode step).
    compute = jnp.dtype(c.compute_dtype)
    check_models(c)
    tokenizer = Tokenizer.from_pretrained(c.tokenizer or c.policy)
    val_engine = make_validation_engine(c)
    val_examples = qa.sample(load_examples(c.data.validation, c, tokenizer, rc,
                                           "data.validation"), c.data.validation_size,
                             seed=c.seed)
    # Before any stage: a data problem is found in seconds, not after the warm-up.
    train_examples = load_examples(c.data.train, c, tokenizer, rc, "data.train")
    _check(c.prompts_per_step <= len(train_examples), "prompts_per_step", c.prompts_per_step,
           f"at most the {len(train_examples)} usable training questions")
    to_compute = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(compute), p))
    initial_policy = c.policy
    if c.warmup.steps:
        def validate_untrained(config, params):
            return validate(config, to_compute(params), tokenizer, val_examples, val_engine,
                            settings, c.seed)

        initial_policy = warm_up_policy(c, workdir, settings, tokenizer, val_engine,
                                        validate_untrained)
    times["warmup"] = time.perf_counter()
    # After the warm-up, so the simulator's training pairs come from a policy that searches.
    simulator_model = (tune_simulator(c, workdir, initial_policy)
                       if c.simulator.kind == "llm" and c.simulator.get("tune") else None)
    times["simulator_tuning"] = time.perf_counter()
    model_config, params = models.load_pretrained(initial_policy,
                                                  dtype=jnp.dtype(c.param_dtype))
    # The frozen initial policy (after the warm-up, if any), placed like the policy (scoring
    # reads it every step).
    ref_params = meshes.train.put(to_compute(params), meshes.train.param_shardings(model_config))
    train_engine = make_training_engine(c, (model_config, ref_params), tokenizer,
                                        simulator_model)
    if isinstance(train_engine, search.LLMSimulator):
        train_engine.place(meshes.simulator)  # its own sub-mesh, or the rollout devices

    uc = settings.update
    total = c.total_steps
    actor_opt = ts.make_optimizer(c.optim.lr, total, c.optim.warmup_ratio,
                                  (c.optim.b1, c.optim.b2), c.optim.weight_decay,
                                  c.optim.grad_clip, uc.updates_per_step)
    critic_opt = (ts.make_optimizer(c.optim.critic_lr, total, c.optim.critic_warmup_ratio,
                                    (c.optim.b1, c.optim.b2), c.optim.weight_decay,
                                    c.optim.grad_clip, uc.updates_per_step)
                  if uc.uses_critic else None)
    fns = ts.make_train_fns(model_config, uc, actor_opt, critic_opt, mesh=meshes.train.mesh,
                            rules=meshes.train.rules)
    critic = (ts.init_critic(model_config, params, jax.random.key(c.seed))
              if uc.uses_critic else None)
    state = fns.init_state(params, critic)
    del params, critic

    # -- data -----------------------------------------------------------------------------------
    data = DataIterator(train_examples, seed=c.seed)
    rollout_fn = _rollout_engine(c, train_engine, tokenizer, meshes.rollout, train_examples)

    # -- resume ---------------------------------------------------------------------------------
    ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=c.checkpoint.keep, create=True))
    writer = MetricsWriter(workdir, enabled=is_main)
    start = 0
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            state, fns.state_sharding)
    # The newest step that loads and matches the checksums saved with it; damaged ones are set
    # aside with a warning saying why.
    restored = checkpoints.restore_latest_intact(manager, abstract)
    if restored is not None:
        _, state, meta = restored
        data.restore(meta["data"])
        start = int(meta["step"])
        writer.truncate_after(start)
        logger.info("resumed from %s at step %d", ckpt_dir, start)
    else:  # a run killed before its first checkpoint starts over: so do its metrics
        writer.truncate_after(-1)

    def save(step: int):
        meta = {"step": step, "data": data.state(), "seed": c.seed}
        checkpoints.save(manager, step, state, meta)

    rollout_sharding = meshes.rollout.param_shardings(model_config)

    def rollout_params():
        """A compute-dtype copy of the policy on this process's rollout devices."""
        return meshes.rollout.put(to_compute(state.params), rollout_sharding)

    preempted = _Preempted()
    base_key = jax.random.key(c.seed)
    val_metrics: dict[str, float] = {}
    if start == 0:
        val_metrics = validate(model_config, rollout_params(), tokenizer, val_examples,
                               val_engine, settings, c.seed, meshes.rollout)
        writer.write(0, val_metrics, prefix="val/")
        logger.info("validation before training: %s", _fmt(val_metrics))

    # Few batch shapes, so scoring and the update compile a handful of times: rollouts are
    # packed with room for the longest possible episode, then cut to the step's longest
    # response rounded up to _RESPONSE_BUCKET (the same on every process); the prompt length
    # only grows (to the next bucket) if a longer prompt shows up.
    response_length = -(-rc.max_response_tokens // 64) * 64
    prompt_length = 0
    nonfinite_streak = 0
    bar = tqdm(range(start, total), initial=start, total=total, desc="train", disable=not is_main,
               dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        key = jax.random.fold_in(base_key, step)
        p_noise = settings.schedule(step + 1, total, c.curriculum.start, c.curriculum.end)
        # Each process's simulator flips its own coins.
        if isinstance(train_engine, search.Reseedable):
            train_engine.reseed((c.seed * 1_000_003 + step) * jax.process_count()
                                + jax.process_index())
        # Every process draws the same questions (same seed) and rolls out its own slice; the
        # lengths come from all of them, so every process builds the same global shapes.
        questions = data.next_batch(c.prompts_per_step)
        prompt_length = max(prompt_length, sampling.bucket_length(max(
            len(agent.prompt_ids(tokenizer, q.question, rc.chat_template)) for q in questions)))
        batch, stats = rollout_fn(model_config, rollout_params(), tokenizer,
                                  questions[my_questions], train_engine,
                                  rollout_config=settings.rollout, sampler=settings.sampler,
                                  rng=key, noise_probability=p_noise,
                                  batch_lengths=(prompt_length, response_length),
                                  placement=meshes.rollout, first_example=first_question)
        t_rollout = time.perf_counter() - t0
        batch = _trim_response(batch, response_length)
        t1 = time.perf_counter()
        # The packing plan is global: built from every process's rows, the same on each.
        mask, tokens, group = (sharding.allgather(x).reshape(-1, *x.shape[1:]) for x in (
            batch.attention_mask, batch.tokens, batch.group))
        # build_settings checked that pack_length holds the longest possible episode.
        plan = uc.plan(mask, c.seed * 1_000_003 + step, tokens, group, batch.prompt_length)
        layout = fns.place_layout(plan)
        scored = fns.score(state.params, ref_params, state.critic_params,
                           meshes.train.put_batch(_batch_dict(batch), batch_size), layout)
        state, update_metrics = fns.update(state, scored, layout)
        update_metrics = {k: float(v) for k, v in jax.device_get(update_metrics).items()}
        t_update = time.perf_counter() - t1

        nonfinite_streak = nonfinite_streak + 1 if update_metrics["nonfinite"] else 0
        if nonfinite_streak:
            logger.warning("step %d: %d update(s) skipped for a non-finite loss or gradient",
                           step + 1, int(update_metrics["nonfinite"]))
        if nonfinite_streak >= c.max_nonfinite_steps:
            writer.close()
            raise RuntimeError(
                f"{nonfinite_streak} consecutive steps had non-finite losses or gradients "
                f"(max_nonfinite_steps={c.max_nonfinite_steps}); stopping. The last good "
                f"checkpoint (step {manager.latest_step()}) in {ckpt_dir} is intact.")

        local = {**stats.summary(), "time/rollout_s": t_rollout, "time/update_s": t_update,
                 "episode/response_tokens":
                     float(batch.attention_mask[:, batch.prompt_length:].sum(1).mean()),
                 "tokens/generated": float(stats.generated_tokens),
                 "tokens/step": float(batch.attention_mask.sum()),
                 "update/padding": packing.padding_fraction(plan)}
        rollout_metrics = _across_processes(local)
        generated = rollout_metrics.pop("tokens/generated") * jax.process_count()
        step_tokens = rollout_metrics.pop("tokens/step") * jax.process_count()
        metrics = {**rollout_metrics, "curriculum/noise_probability": p_noise,
                   **{f"train/{k}": v for k, v in update_metrics.items()},
                   "throughput/rollout_tokens_per_s": generated / rollout_metrics["time/rollout_s"],
                   "throughput/update_tokens_per_s": step_tokens / rollout_metrics["time/update_s"],
                   "data/epoch": data.epoch}
        done = step + 1
        if done % c.validation.every == 0 or done == total:
            val_metrics = validate(model_config, rollout_params(), tokenizer, val_examples,
                                   val_engine, settings, c.seed, meshes.rollout)
            metrics.update({f"val/{k}": v for k, v in val_metrics.items()})
        writer.write(done, metrics)
        bar.set_postfix(f1=f"{metrics['reward/f1']:.3f}", p=f"{p_noise:.2f}",
                        kl=f"{update_metrics.get('kl_loss', 0.0):.4f}")
        # A SIGTERM seen by any process stops all of them at the same step (they save together).
        stop = bool(sharding.allgather(np.array(preempted.flag)).any())
        # A step whose update was skipped is not saved: the last checkpoint stays the last good one.
        if (done % c.checkpoint.every == 0 or done == total or stop) and not nonfinite_streak:
            save(done)
        if stop:
            logger.warning("preempted: checkpoint saved at step %d; exiting", done)
            writer.close()
            sys.exit(0)

    writer.close()
    # Gathered on every process (a collective), written by one.
    host_params = sharding.to_host(state.params) if c.export_hf else None
    if is_main:
        plot_run(workdir)
        if c.export_hf:
            models.save_pretrained(model_config, host_params,
                                   os.path.join(workdir, "hf_policy"), tokenizer=tokenizer)
        with open(os.path.join(workdir, "final_validation.json"), "w") as f:
            json.dump(val_metrics, f, indent=2)
        times["rl"] = time.perf_counter()
        minutes = {k: (times[k] - t) / 60 for k, t in zip(
            ("warmup", "simulator_tuning", "rl"), (times["start"], times["warmup"],
                                                   times["simulator_tuning"]), strict=True)}
        logger.info("done in %.1f min (format warm-up %.1f, simulator tuning %.1f, RL and "
                    "validation %.1f; a stage reused from an earlier run counts ~0)",
                    sum(minutes.values()), *minutes.values())
        logger.info("final validation: %s", _fmt(val_metrics))
        logger.info("outputs in %s: hf_policy/ (the trained policy), final_validation.json, "
                    "metrics.jsonl, plots/training_curves.png", workdir)
    return val_metrics


def describe_run(c: ml_collections.ConfigDict, workdir: str) -> str:
    """A few lines saying what each stage of this run does and where its outputs go."""
    stages = []
    if c.warmup.steps:
        stages.append(f"format warm-up: behaviour cloning of {c.policy} on demonstration "
                      f"episodes (search with {c.validation.engine}, read, answer), "
                      f"{c.warmup.steps} steps -> {os.path.join(workdir, 'warmup', 'hf')}")
    if c.simulator.kind == "llm" and c.simulator.get("tune"):
        sft = c.simulator.sft
        stages.append(f"simulator tuning: the policy searches {sft.collect.engine} on "
                      f"{sft.data.num_questions} questions, the results are labelled useful / "
                      f"noisy, {c.simulator.model} is fine-tuned on them ({sft.finetune.steps} "
                      f"steps) and reported -> {os.path.join(workdir, 'simulator_sft', 'hf')}")
    engine = {"llm": "the tuned simulator" if c.simulator.get("tune") else
              f"the simulator {c.simulator.model}", "server": f"the simulator at "
              f"{c.simulator.url}"}.get(c.simulator.kind, f"the real engine {c.simulator.kind}")
    stages.append(f"RL: {c.total_steps} {c.algorithm.estimator} steps of {c.prompts_per_step} "
                  f"questions x {c.rollout.samples_per_prompt} episodes against {engine} "
                  f"(noise {c.curriculum.start:.2f} -> {c.curriculum.end:.2f}), validated on "
                  f"{c.data.validation_size} questions with {c.validation.engine} every "
                  f"{c.validation.every} steps -> metrics.jsonl, plots/, checkpoints/, hf_policy/, "
                  f"final_validation.json")
    lines = [f"  stage {i}/{len(stages)} {stage}" for i, stage in enumerate(stages, 1)]
    return "\n".join([f"training run in {workdir} (re-running the command resumes it):", *lines])


def _fmt(m: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in m.items() if "/" not in k)


def main(argv=None):
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs",
                               "default.py"), "ml_collections config file", lock_config=True)
    workdir_flag = flags.DEFINE_string("workdir", None, "run directory (resumes if it holds "
                                       "checkpoints)", required=True)
    distributed = flags.DEFINE_bool(
        "distributed", False, "multi-host: jax.distributed.initialize() with the cluster "
        "auto-detected (Cloud TPU pod slices, SLURM); see --coordinator_address otherwise")
    coordinator = flags.DEFINE_string(
        "coordinator_address", None, "multi-host by hand: host:port of process 0's coordinator "
        "(with --num_processes and --process_id)")
    num_processes = flags.DEFINE_integer("num_processes", None, "with --coordinator_address")
    process_id = flags.DEFINE_integer("process_id", None, "with --coordinator_address")

    def run(_):
        setup_logging()
        # Before anything touches a device: afterwards jax.devices() lists every process's.
        if coordinator.value:
            if num_processes.value is None or process_id.value is None:
                print("error: --coordinator_address needs --num_processes and --process_id",
                      file=sys.stderr)
                return 2
            jax.distributed.initialize(coordinator_address=coordinator.value,
                                       num_processes=num_processes.value,
                                       process_id=process_id.value)
        elif distributed.value:
            jax.distributed.initialize()
        try:
            metrics = train(config_flag.value, workdir_flag.value)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps({"final_validation": metrics}, indent=2))
        return 0

    app.run(lambda a: sys.exit(run(a)), argv=argv)


if __name__ == "__main__":
    main()
