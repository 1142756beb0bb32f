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
Hugging Face directory, `<workdir>/hf_policy`; each validation's episodes (question, response,
answer, F1) to `<workdir>/validation/step_<N>.jsonl`; with `train_traces`, each RL step's
episodes (with their GRPO group and coins) to `<workdir>/train_traces/step_<N>.jsonl`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from zerosearch_jax import (
    agent,
    checkpoints,
    curriculum,
    hooks,
    models,
    packing,
    sampling,
    search,
    sharding,
    stages,
    training,
)
from zerosearch_jax import metrics as metrics_lib
from zerosearch_jax.cli import run_command
from zerosearch_jax.data import qa
from zerosearch_jax.data.iterator import DataIterator
from zerosearch_jax.inputs import (
    ConfigError,
    check_models,
    load_examples,
    make_engine,
    make_validation_engine,
)
from zerosearch_jax.metrics import MetricsWriter
from zerosearch_jax.plot import plot_run
from zerosearch_jax.rl import train_step as ts
from zerosearch_jax.settings import build, check
from zerosearch_jax.simulator_sft import pipeline
from zerosearch_jax.tokenizer import Tokenizer

logger = logging.getLogger("zerosearch_jax.train")


# ----------------------------------------------------------------------------------------------
# Config -> typed settings (every check happens here, before any work).
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """The run's typed settings, each built from its config section (`settings.build`)."""

    rollout: agent.RolloutConfig  # config.rollout
    sampler: sampling.TopP  # config.rollout: top_p, temperature
    update: ts.UpdateConfig  # config.algorithm (its loss and advantage configs too)
    optim: training.OptimizerConfig  # config.optim
    mesh: sharding.MeshConfig  # config.mesh
    schedule: Callable[[int, int, float, float], float]  # config.curriculum


# rollout.engine: `in_graph` runs each rollout as one program (agent/episode.py; the in-process
# simulator sharing the policy's tokenizer), `host` the text-level host loop (agent/rollout.py;
# every engine), `auto` the first when the engine allows it.
ROLLOUT_ENGINES = ("auto", "in_graph", "host")


def build_settings(c: ml_collections.ConfigDict) -> Settings:
    """Every config check, before any work: each section's dataclass checks its own values;
    the checks that span sections follow (`check_run`)."""
    rollout = build(agent.RolloutConfig, c.rollout, "rollout")
    update = build(ts.UpdateConfig, c.algorithm, "algorithm", advantage_estimator=c.algorithm
                   .estimator, remat=c.remat, compute_dtype=c.compute_dtype,
                   temperature=c.rollout.temperature)
    try:
        update.check_batch_size(c.prompts_per_step * rollout.samples_per_prompt)
    except ValueError as e:
        raise ConfigError(f"config.algorithm: {e}") from None
    settings = Settings(rollout, build(sampling.TopP, c.rollout, "rollout", p=c.rollout.top_p),
                        update, build(training.OptimizerConfig, c.optim, "optim"),
                        build(sharding.MeshConfig, c.mesh, "mesh"), _schedule(c))
    check_run(c, settings)
    return settings


def _schedule(c: ml_collections.ConfigDict) -> Callable[[int, int, float, float], float]:
    """The curriculum's noise schedule, checked on the run's first step."""
    try:
        schedule = curriculum.get_schedule(c.curriculum.schedule)
        if c.curriculum.schedule == "exponential":  # the only schedule with a base
            schedule = functools.partial(schedule, base=c.curriculum.base)
        schedule(1, c.total_steps, c.curriculum.start, c.curriculum.end)
    except ValueError as e:
        raise ConfigError(f"config.curriculum: {e}") from None
    return schedule


def check_run(c: ml_collections.ConfigDict, settings: Settings) -> None:
    """The checks of values without a dataclass of their own and of values that span
    sections; every error names the key."""
    check(c.total_steps >= 1, "total_steps", c.total_steps, "an integer >= 1")
    check(c.prompts_per_step >= 1, "prompts_per_step", c.prompts_per_step, ">= 1")
    check(c.max_nonfinite_steps >= 1, "max_nonfinite_steps", c.max_nonfinite_steps,
          "an integer >= 1 (consecutive skipped updates before the run stops)")
    for key in ("param_dtype", "compute_dtype"):
        check(c[key] in ("float32", "bfloat16"), key, c[key], "float32 or bfloat16")
    for key in ("every", "keep"):
        check(c.checkpoint[key] >= 1, f"checkpoint.{key}", c.checkpoint[key], ">= 1")
    check(c.data.on_error in ("raise", "skip"), "data.on_error", c.data.on_error,
          "raise or skip")
    check(c.data.validation_size >= 1, "data.validation_size", c.data.validation_size, ">= 1")
    _check_engines(c)
    engine_mode = c.rollout.get("engine", "auto")
    check(engine_mode in ROLLOUT_ENGINES, "rollout.engine", engine_mode,
          " | ".join(ROLLOUT_ENGINES))
    check(engine_mode != "in_graph" or c.simulator.kind == "llm", "rollout.engine",
          engine_mode, f"auto or host with simulator.kind={c.simulator.kind!r} (the in-graph "
          "rollout runs the in-process llm simulator)")
    rollout, a, w = settings.rollout, c.algorithm, c.warmup
    longest = rollout.max_prompt_tokens + rollout.max_response_tokens
    for key, value in (("algorithm.pack_length", a.pack_length),
                       ("warmup.pack_length", w.pack_length if w.steps else 0)):
        check(value == 0 or value >= longest, key, value, f"0 (no packing) or >= the longest "
              f"possible episode, {longest} tokens (rollout.max_prompt_tokens + the response's "
              "turns and observations)")
    check(w.steps >= 0, "warmup.steps", w.steps, ">= 0 (0: no format warm-up)")
    if w.steps:
        for key in ("num_questions", "batch_size", "micro_batch_size"):
            check(w[key] >= 1, f"warmup.{key}", w[key], ">= 1")
        check(w.lr > 0, "warmup.lr", w.lr, "> 0")
        reread = w.get("reread_single_hop", 0.0)
        check(0.0 <= reread <= 1.0, "warmup.reread_single_hop", reread, "in [0, 1]")
        check(rollout.max_turns >= 1, "rollout.max_turns", rollout.max_turns,
              ">= 1 with warmup.steps > 0 (demonstrations search at least once)")


def _check_engines(c: ml_collections.ConfigDict) -> None:
    """The training engine (`simulator`), the validation engine and where they run."""
    s, v = c.simulator, c.validation
    check(s.kind in TRAINING_ENGINES, "simulator.kind", s.kind, ", ".join(TRAINING_ENGINES))
    check(v.engine in ("bm25", "searchr1", "serpapi"), "validation.engine", v.engine,
          "bm25, searchr1 or serpapi")
    check(v.every >= 1, "validation.every", v.every, ">= 1")
    check(v.topk >= 1, "validation.topk", v.topk, ">= 1")
    check(v.engine != "searchr1" or bool(v.url), "validation.url", v.url,
          "the retriever's URL with validation.engine = searchr1")
    check(s.kind not in ("server", "searchr1") or bool(s.url), "simulator.url", s.url,
          f"the endpoint with simulator.kind = {s.kind}")
    check(s.variant in search.simulator.SIMULATOR_VARIANTS, "simulator.variant", s.variant,
          " or ".join(search.simulator.SIMULATOR_VARIANTS))
    if s.kind in ("llm", "server"):
        check(s.max_new_tokens >= 1, "simulator.max_new_tokens", s.max_new_tokens, ">= 1")
        check(s.temperature > 0, "simulator.temperature", s.temperature, "> 0")
        check(s.topk >= 1, "simulator.topk", s.topk, ">= 1")
    if s.kind == "llm" and s.get("tune"):
        pipeline.build_settings(s.sft, prefix="config.simulator.sft.")
    check(c.mesh.simulator_devices == 0 or s.kind == "llm", "mesh.simulator_devices",
          c.mesh.simulator_devices, f"0 with simulator.kind={s.kind!r} (a sub-mesh is for "
          "the in-process llm simulator)")


def make_meshes(settings: Settings, batch_size: int) -> sharding.Meshes:
    """The run's placements on the devices there are (every process's): checks what needs the
    device count, naming the config key."""
    try:
        meshes = settings.mesh.make()
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None
    shards, n = meshes.train.batch_shards, settings.rollout.samples_per_prompt
    check(batch_size % shards == 0, "prompts_per_step", batch_size // n,
          f"prompts_per_step x rollout.samples_per_prompt = {batch_size} rows to be a multiple "
          f"of the {shards} batch shards of mesh {dict(meshes.train.mesh.shape)}")
    try:
        start, stop = meshes.train.process_rows(batch_size)
    except ValueError as e:
        raise ConfigError(f"config.mesh.axis_rules: {e}") from None
    check(start % n == 0 and stop % n == 0, "prompts_per_step", batch_size // n,
          f"a multiple of the {jax.process_count()} processes (each rolls out whole questions)")
    return meshes


def response_width(rollout_config: agent.RolloutConfig) -> int:
    """The rollouts' response columns: room for the longest possible response, rounded up to
    64 (fixed for the run, so the rollout compiles once)."""
    return -(-rollout_config.max_response_tokens // 64) * 64


# ----------------------------------------------------------------------------------------------
# Engines.
# ----------------------------------------------------------------------------------------------


def choose_rollout(c: ml_collections.ConfigDict, engine, tokenizer: Tokenizer, placement,
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


# simulator.kind -> the engine's registry name (`inputs.make_engine`).
TRAINING_ENGINES = {"llm": "simulator", "server": "simulator_server", "bm25": "bm25",
                    "searchr1": "searchr1"}


def make_training_engine(c: ml_collections.ConfigDict, policy: tuple, tokenizer: Tokenizer,
                         model: str | None = None, policy_path: str | None = None
                         ) -> search.SearchEngine:
    """The engine the policy trains against. policy: (config, params) of the frozen reference,
    loaded from `policy_path` (default `c.policy`; the warmed-up policy after a warm-up);
    model: overrides `simulator.model` (the tuned simulator's directory)."""
    s = c.simulator
    weights = None
    if s.kind == "llm":
        model = model or s.model
        # The same (frozen, compute-dtype) weights as the reference: only if they are the same
        # model (after a warm-up, `simulator.model = policy` names the untrained base).
        if model == (policy_path or c.policy):
            weights = (*policy, tokenizer)
        else:
            weights = (*models.load_pretrained(model, dtype=jnp.dtype(c.compute_dtype)),
                       Tokenizer.from_pretrained(model))
    # One compiled generation program for every call: a turn searches with at most every row
    # of the rollout. Real engines during training (Search-R1 style) take validation's topk.
    rows = c.prompts_per_step * c.rollout.samples_per_prompt // jax.process_count()
    simulated = s.kind in ("llm", "server")
    return make_engine(TRAINING_ENGINES[s.kind], c, topk=s.topk if simulated else
                       c.validation.topk, url=s.url, simulator=s, model=weights,
                       server_model=s.model, batch_size=rows, key="simulator.kind")


# ----------------------------------------------------------------------------------------------
# The run: its parts, assembled once; the step; the loop.
# ----------------------------------------------------------------------------------------------


def batch_arrays(batch: agent.RolloutBatch) -> dict[str, np.ndarray]:
    """The rollout batch's [B, T] arrays (and group [B]) that scoring reads, by name."""
    return {k: np.asarray(getattr(batch, k)) for k in
            ("tokens", "attention_mask", "positions", "loss_mask", "logprobs", "rewards",
             "group")}


_RESPONSE_BUCKET = 128


def trim_response(batch: agent.RolloutBatch, max_response: int) -> agent.RolloutBatch:
    """The batch cut after the longest response of the step (over every process), rounded up
    to `_RESPONSE_BUCKET` tokens (at most `max_response`). Responses are right-padded, so only
    padding goes: an unpacked update over a [B, P + R] batch of mostly short episodes would
    otherwise pay for the longest possible one on every row."""
    P = batch.prompt_length
    longest = int(batch.attention_mask[:, P:].sum(axis=1).max(initial=0))
    longest = int(sharding.allgather(np.array(longest)).max())
    R = min(max_response, max(1, -(-longest // _RESPONSE_BUCKET)) * _RESPONSE_BUCKET)
    cut = lambda x: x[:, :P + R]  # noqa: E731
    return batch.replace(tokens=cut(batch.tokens), attention_mask=cut(batch.attention_mask),
                         positions=cut(batch.positions), loss_mask=cut(batch.loss_mask),
                         logprobs=cut(batch.logprobs), rewards=cut(batch.rewards))


@dataclasses.dataclass
class Run:
    """Everything a training run holds, assembled once by `assemble` (the loop's inputs)."""

    c: ml_collections.ConfigDict
    settings: Settings
    meshes: sharding.Meshes
    tokenizer: Tokenizer
    model_config: models.ModelConfig
    ref_params: Any
    fns: ts.TrainFns
    state: Any
    data: DataIterator
    rollout_fn: Any
    train_engine: search.SearchEngine
    val_engine: search.SearchEngine
    val_examples: list
    to_compute: Any
    my_questions: slice  # this process's questions of a step (its rows of the global batch)
    batch_size: int
    prompt_length: int = 0  # the rollouts' prompt width: grows to the next bucket if needed
    workdir: str = ""  # validation episodes go to <workdir>/validation/step_<N>.jsonl

    @functools.cached_property
    def rollout_shardings(self) -> Any:
        """The policy's shardings on this process's rollout devices (fixed for the run)."""
        return self.meshes.rollout.param_shardings(self.model_config)

    def rollout_params(self, state) -> Any:
        """A compute-dtype copy of the policy on this process's rollout devices."""
        return self.meshes.rollout.put(self.to_compute(state.params), self.rollout_shardings)

    def validate(self, state, step: int) -> dict[str, float]:
        return hooks.validate(self.model_config, self.rollout_params(state), self.tokenizer,
                              self.val_examples, self.val_engine, self.settings.rollout,
                              self.c.seed, self.meshes.rollout,
                              trace_path=validation_traces(self.workdir, step))


def validation_traces(workdir: str, step: int | str) -> str:
    """Where a validation's episodes go: `<workdir>/validation/step_000006.jsonl` (or
    `untrained.jsonl`, the policy before the warm-up)."""
    name = step if isinstance(step, str) else f"step_{step:06d}"
    return os.path.join(workdir, "validation", f"{name}.jsonl")


def train_traces(workdir: str, step: int) -> str:
    """Where RL step `step`'s episodes go with `train_traces`: `<workdir>/train_traces/
    step_000001.jsonl` (`.p<i>` before `.jsonl` for process i of several)."""
    return hooks.process_path(os.path.join(workdir, "train_traces", f"step_{step:06d}.jsonl"))


def assemble(c: ml_collections.ConfigDict, workdir: str, settings: Settings,
             times: dict[str, float]) -> Run:
    """The run's parts: meshes, data, engines, the stages before RL (cached), the policy, its
    frozen reference and the jitted step functions with their initial state."""
    rc = settings.rollout
    batch_size = c.prompts_per_step * rc.samples_per_prompt
    meshes = make_meshes(settings, batch_size)  # the checks that need the device count
    check(c.data.validation_size >= jax.process_count(), "data.validation_size",
           c.data.validation_size, f">= the {jax.process_count()} processes")
    # This process rolls out the questions whose rows its training devices hold (all of them
    # in a single process), so its rows become its part of the global batch as they are.
    row_start, row_stop = meshes.train.process_rows(batch_size)
    n = rc.samples_per_prompt
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(c.to_json_best_effort(indent=2))
        logger.info("%s", describe_run(c, workdir))
    check_models(c)
    tokenizer = Tokenizer.from_pretrained(c.tokenizer or c.policy)
    val_engine = make_validation_engine(c)
    val_examples = qa.sample(load_examples(c.data.validation, c, tokenizer, rc,
                                           "data.validation"), c.data.validation_size,
                             seed=c.data.validation_seed, stratify=c.data.validation_stratify)
    # Before any stage: a data problem is found in seconds, not after the warm-up.
    train_examples = load_examples(c.data.train, c, tokenizer, rc, "data.train")
    check(c.prompts_per_step <= len(train_examples), "prompts_per_step", c.prompts_per_step,
           f"at most the {len(train_examples)} usable training questions")
    # Master weights (and Adam moments) in param_dtype; rollouts, the frozen reference and the
    # simulator hold compute_dtype copies (a cast per step is far cheaper than casting every
    # weight at every decode step).
    compute = jnp.dtype(c.compute_dtype)
    to_compute = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(compute), p))
    initial_policy = c.policy
    if c.warmup.steps:
        def validate_untrained(config, params):
            # Placed as every later validation's policy (`Run.rollout_params`): the programs
            # it compiles are then the ones those reuse (on None they compiled anew, ~25 s).
            params = meshes.rollout.put(to_compute(params), meshes.rollout.param_shardings(config))
            return hooks.validate(config, params, tokenizer, val_examples, val_engine, rc,
                                  c.seed, meshes.rollout,
                                  trace_path=validation_traces(workdir, "untrained"))

        initial_policy = stages.warm_up_policy(c, workdir, rc, tokenizer, val_engine,
                                               validate_untrained)
    times["warmup"] = time.perf_counter()
    # After the warm-up: a collection that runs the policy (simulator.sft.collect.query_sources)
    # runs the warmed-up one, which searches.
    simulator_model = (stages.tune_simulator(c, workdir, initial_policy)
                       if c.simulator.kind == "llm" and c.simulator.get("tune") else None)
    times["simulator_tuning"] = time.perf_counter()
    model_config, params = models.load_pretrained(initial_policy,
                                                  dtype=jnp.dtype(c.param_dtype))
    # The frozen initial policy (after the warm-up, if any), placed like the policy (scoring
    # reads it every step).
    ref_params = meshes.train.put(to_compute(params), meshes.train.param_shardings(model_config))
    train_engine = make_training_engine(c, (model_config, ref_params), tokenizer,
                                        simulator_model, initial_policy)
    if isinstance(train_engine, search.LLMSimulator):
        train_engine.place(meshes.simulator)  # its own sub-mesh, or the rollout devices
    fns, state = _learner(c, settings, meshes, model_config, params)
    return Run(c, settings, meshes, tokenizer, model_config, ref_params, fns, state,
               DataIterator(train_examples, seed=c.seed, stratify=c.data.train_stratify),
               choose_rollout(c, train_engine, tokenizer, meshes.rollout, train_examples),
               train_engine, val_engine, val_examples, to_compute,
               slice(row_start // n, row_stop // n), batch_size, workdir=workdir)


def _learner(c: ml_collections.ConfigDict, settings: Settings, meshes: sharding.Meshes,
             model_config: models.ModelConfig, params) -> tuple[ts.TrainFns, Any]:
    """The jitted score and update functions and the initial train state (policy, optimizer
    states, a critic initialised from the policy when the estimator needs one)."""
    uc, o = settings.update, settings.optim
    fns = ts.make_train_fns(
        model_config, uc, o.make(c.total_steps, uc.updates_per_step),
        o.make(c.total_steps, uc.updates_per_step, critic=True) if uc.uses_critic else None,
        mesh=meshes.train.mesh, rules=meshes.train.rules)
    critic = (ts.init_critic(model_config, params, jax.random.key(c.seed))
              if uc.uses_critic else None)
    return fns, fns.init_state(params, critic)


def rollout_step(run: Run, state, step: int) -> tuple[agent.RolloutBatch, Any, float]:
    """One step's episodes: the step's questions (every process draws the same and rolls out
    its own slice), the curriculum's noise probability, the simulator reseeded from (seed,
    step) so a resumed run sees the same documents. Returns (batch, stats, noise)."""
    c, rc = run.c, run.settings.rollout
    p_noise = run.settings.schedule(step + 1, c.total_steps, c.curriculum.start,
                                    c.curriculum.end)
    if isinstance(run.train_engine, search.Reseedable):  # each process flips its own coins
        run.train_engine.reseed((c.seed * 1_000_003 + step) * jax.process_count()
                                + jax.process_index())
    questions = run.data.next_batch(c.prompts_per_step)
    # The lengths come from every process's questions, so all build the same global shapes.
    run.prompt_length = max(run.prompt_length, sampling.bucket_length(max(
        len(agent.prompt_ids(run.tokenizer, q.question, rc.chat_template)) for q in questions)))
    batch, stats = run.rollout_fn(
        run.model_config, run.rollout_params(state), run.tokenizer, questions[run.my_questions],
        run.train_engine, rollout_config=rc, sampler=run.settings.sampler,
        rng=jax.random.fold_in(jax.random.key(c.seed), step), noise_probability=p_noise,
        batch_lengths=(run.prompt_length, response_width(rc)), placement=run.meshes.rollout,
        first_example=run.my_questions.start)
    if c.train_traces:  # the episodes RL learns from, for reading what a step rewarded
        n = rc.samples_per_prompt
        mine = [q for q in questions[run.my_questions] for _ in range(n)]  # episode order
        hooks.write_traces(train_traces(run.workdir, step + 1), mine, stats, group=batch.group,
                           noise_probability=np.full(len(mine), p_noise))
    return batch, stats, p_noise


def learner_step(run: Run, state, batch: agent.RolloutBatch, step: int):
    """Scoring and the update on one step's batch. Packed (the default), scoring and the update
    run on rows of fixed shapes, so they compile once; unpacked (pack_length=0), the batch is
    first cut after the step's longest response. Returns (state, update metrics, the plan)."""
    uc, c = run.settings.update, run.c
    if not uc.pack_length:
        batch = trim_response(batch, response_width(run.settings.rollout))
    # The packing plan is global: built from every process's rows, the same on each.
    mask, tokens, group = (sharding.allgather(x).reshape(-1, *x.shape[1:]) for x in (
        batch.attention_mask, batch.tokens, batch.group))
    # build_settings checked that pack_length holds the longest possible episode.
    plan = packing.plan(mask, seed=c.seed * 1_000_003 + step, tokens=tokens, group=group,
                        prompt_length=batch.prompt_length, **uc.packing_args)
    layout = run.fns.place_layout(plan)
    scored = run.fns.score(state.params, run.ref_params, state.critic_params,
                           run.meshes.train.put_batch(batch_arrays(batch), run.batch_size), layout)
    state, update_metrics = run.fns.update(state, scored, layout)
    return state, {k: float(v) for k, v in jax.device_get(update_metrics).items()}, plan


def step_metrics(batch: agent.RolloutBatch, stats, update_metrics: dict[str, float], plan,
                 p_noise: float, times: tuple[float, float], epoch: int) -> dict[str, float]:
    """One step's metrics row, the same on every process: rollout (`reward/*`, `episode/*`),
    curriculum, update (`train/*`), throughput and time."""
    local = {**stats.summary(), "time/rollout_s": times[0], "time/update_s": times[1],
             "episode/response_tokens":
                 float(batch.attention_mask[:, batch.prompt_length:].sum(1).mean()),
             "tokens/generated": float(stats.generated_tokens),
             "tokens/step": float(batch.attention_mask.sum()),
             "update/padding": packing.padding_fraction(plan),
             # Each process holds whole groups, as many as every other: the mean of the local
             # shares is the global share.
             "reward/groups_with_spread": metrics_lib.groups_with_spread(
                 np.asarray(batch.rewards).sum(axis=1), np.asarray(batch.group))}
    rollout_metrics = hooks.across_processes(local)
    generated = rollout_metrics.pop("tokens/generated") * jax.process_count()
    step_tokens = rollout_metrics.pop("tokens/step") * jax.process_count()
    return {**rollout_metrics, "curriculum/noise_probability": p_noise,
            **{f"train/{k}": v for k, v in update_metrics.items()},
            "throughput/rollout_tokens_per_s": generated / rollout_metrics["time/rollout_s"],
            "throughput/update_tokens_per_s": step_tokens / rollout_metrics["time/update_s"],
            "data/epoch": epoch}


def train(c: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Runs (or resumes) training; returns the final validation metrics."""
    settings = build_settings(c)  # every config check, before any work
    times = {"start": time.perf_counter()}
    run = assemble(c, workdir, settings, times)
    ckpt = hooks.Checkpointer(workdir, c.checkpoint.keep, c.checkpoint.every)
    start, state = ckpt.restore(run.state, run.fns.state_sharding, run.data)
    ckpt.require_room(state, start, c.total_steps,
                      checkpoints.state_bytes(state.params) if c.export_hf else 0)
    run.state = None  # the loop's `state` is the only live one (the update donates it)
    with MetricsWriter(workdir, enabled=jax.process_index() == 0) as writer:
        writer.truncate_after(start if start else -1)  # killed before a checkpoint: start over
        state, val_metrics = loop(run, state, start, writer, ckpt)
    finish(run, state, workdir, val_metrics, times)
    return val_metrics


def loop(run: Run, state, start: int, writer: MetricsWriter, ckpt: hooks.Checkpointer):
    """The RL steps from `start`: rollout -> learner step -> hooks (non-finite guard,
    validation, metrics, checkpoint, preemption). Returns (state, the last validation)."""
    c, total = run.c, run.c.total_steps
    guard = hooks.NonfiniteGuard(c.max_nonfinite_steps, ckpt.directory, ckpt.manager.latest_step)
    preempted = hooks.Preempted()
    val_metrics: dict[str, float] = {}
    if start == 0 and c.validation.before_rl:
        t0 = time.perf_counter()
        val_metrics = run.validate(state, 0)
        writer.write(0, {**{f"val/{k}": v for k, v in val_metrics.items()},
                         "time/validation_s": time.perf_counter() - t0})
        logger.info("validation before training: %s", metrics_lib.summary(val_metrics))
    bar = tqdm(range(start, total), initial=start, total=total, desc="train",
               disable=jax.process_index() != 0, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        batch, stats, p_noise = rollout_step(run, state, step)
        t1 = time.perf_counter()
        state, update_metrics, plan = learner_step(run, state, batch, step)
        metrics = step_metrics(batch, stats, update_metrics, plan, p_noise,
                               (t1 - t0, time.perf_counter() - t1), run.data.epoch)
        guard.observe(step + 1, update_metrics["nonfinite"])
        done = step + 1
        if done % c.validation.every == 0 or done == total:
            t2 = time.perf_counter()
            val_metrics = run.validate(state, done)
            metrics.update({f"val/{k}": v for k, v in val_metrics.items()})
            metrics["time/validation_s"] = time.perf_counter() - t2
        writer.write(done, metrics)
        bar.set_postfix(f1=f"{metrics['reward/f1']:.3f}", p=f"{p_noise:.2f}",
                        kl=f"{update_metrics.get('kl_loss', 0.0):.4f}")
        stop = preempted.any_process()
        if not guard.streak:  # a step whose update was skipped is not saved
            ckpt.maybe_save(done, total, state, run.data, c.seed, force=stop)
        if stop:
            logger.warning("preempted: checkpoint saved at step %d; exiting", done)
            writer.close()
            sys.exit(0)
    return state, val_metrics


def finish(run: Run, state, workdir: str, val_metrics: dict[str, float],
           times: dict[str, float]) -> None:
    """The run's outputs: the policy as a Hugging Face directory, the plots, the final
    validation, and how long each stage took."""
    c = run.c
    # Gathered on every process (a collective), written by one.
    host_params = sharding.to_host(state.params) if c.export_hf else None
    if jax.process_index() != 0:
        return
    plot_run(workdir)
    if c.export_hf:
        models.save_pretrained(run.model_config, host_params,
                               os.path.join(workdir, "hf_policy"), tokenizer=run.tokenizer)
    # The paired change over step 0 goes to the file and the log line (process 0 reads the
    # episodes), not into the returned metrics, which are every process's same numbers.
    final = {**val_metrics, **gain_over_start(c, workdir, len(run.val_examples))}
    with open(os.path.join(workdir, "final_validation.json"), "w") as f:
        json.dump(final, f, indent=2)
    times["rl"] = time.perf_counter()
    minutes = {k: (times[k] - t) / 60 for k, t in zip(
        ("warmup", "simulator_tuning", "rl"), (times["start"], times["warmup"],
                                               times["simulator_tuning"]), strict=True)}
    logger.info("done in %.1f min (format warm-up %.1f, simulator tuning %.1f, RL and "
                "validation %.1f; a stage reused from an earlier run counts ~0)",
                sum(minutes.values()), *minutes.values())
    logger.info("final validation: %s", metrics_lib.summary(final))
    logger.info("outputs in %s: hf_policy/ (the trained policy), final_validation.json, "
                "metrics.jsonl, plots/training_curves.png", workdir)


def gain_over_start(c: ml_collections.ConfigDict, workdir: str,
                    n_questions: int) -> dict[str, float]:
    """The final validation's F1 change over step 0's, question by question, with its paired
    interval (`hooks.gain_over`). Step 0's episodes are this run's, or those of the run whose
    stages it shares (`stages_dir` with `validation.before_rl=False`)."""
    start = validation_traces(workdir, 0)
    if not hooks.episode_files(start) and c.get("stages_dir"):
        start = validation_traces(c.stages_dir, 0)
    return hooks.gain_over(start, validation_traces(workdir, c.total_steps), n_questions,
                           seed=c.seed)


def describe_run(c: ml_collections.ConfigDict, workdir: str) -> str:
    """A few lines saying what each stage of this run does and where its outputs go."""
    parts = []
    root = stages.stage_root(c, workdir)
    reused = " (reused: config.stages_dir)" if c.get("stages_dir") else ""
    if c.warmup.steps:
        parts.append(f"format warm-up: behaviour cloning of {c.policy} on demonstration "
                     f"episodes (search with {c.validation.engine}, read, answer), "
                     f"{c.warmup.steps} steps -> {os.path.join(root, 'warmup', 'hf')}{reused}")
    if c.simulator.kind == "llm" and c.simulator.get("tune"):
        sft = c.simulator.sft
        parts.append(f"simulator tuning: the policy searches {sft.collect.engine} on "
                     f"{sft.data.num_questions} questions, the results are labelled useful / "
                     f"noisy, {c.simulator.model} is fine-tuned on them ({sft.finetune.steps} "
                     f"steps) and reported -> {os.path.join(root, 'simulator_sft', 'hf')}{reused}")
    engine = {"llm": "the tuned simulator" if c.simulator.get("tune") else
              f"the simulator {c.simulator.model}", "server": f"the simulator at "
              f"{c.simulator.url}"}.get(c.simulator.kind, f"the real engine {c.simulator.kind}")
    # Only a simulator takes the curriculum's noise probability; a real engine ignores it.
    noise = (f" (noise {c.curriculum.start:.2f} -> {c.curriculum.end:.2f})"
             if c.simulator.kind in ("llm", "server") else "")
    parts.append(f"RL: {c.total_steps} {c.algorithm.estimator} steps of {c.prompts_per_step} "
                 f"questions x {c.rollout.samples_per_prompt} episodes against {engine}{noise}, "
                 f"validated on "
                 f"{c.data.validation_size} questions with {c.validation.engine} every "
                 f"{c.validation.every} steps -> metrics.jsonl, plots/, checkpoints/, hf_policy/, "
                 f"final_validation.json")
    lines = [f"  stage {i}/{len(parts)} {stage}" for i, stage in enumerate(parts, 1)]
    return "\n".join([f"training run in {workdir} (re-running the command resumes it):", *lines])


def _command(c: ml_collections.ConfigDict, workdir: str) -> int:
    print(json.dumps({"final_validation": train(c, workdir)}, indent=2))
    return 0


def main(argv=None):
    run_command(_command, "default.py", "run directory (resumes if it holds checkpoints)",
                errors=(ConfigError,), multi_host=True, argv=argv)

if __name__ == "__main__":
    main()
