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

from zerosearch_jax import agent, curriculum, models, sampling, search
from zerosearch_jax.data import qa, synthetic
from zerosearch_jax.data.iterator import DataIterator
from zerosearch_jax.rl import algorithms as algo
from zerosearch_jax.rl import train_step as ts
from zerosearch_jax.tokenizer import Tokenizer

logger = logging.getLogger("zerosearch_jax.train")


class ConfigError(ValueError):
    """A config value that cannot work, named with its key."""


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
    _check(c.checkpoint.every >= 1, "checkpoint.every", c.checkpoint.every, ">= 1")
    _check(c.checkpoint.keep >= 1, "checkpoint.keep", c.checkpoint.keep, ">= 1")
    _check(c.data.on_error in ("raise", "skip"), "data.on_error", c.data.on_error,
           "raise or skip")
    _check(len(tuple(c.mesh.shape)) == 3, "mesh.shape", c.mesh.shape,
           "(data, fsdp, tensor), -1 for one inferred axis")
    try:
        schedule = curriculum.get_schedule(c.curriculum.schedule)
        schedule(1, c.total_steps, c.curriculum.start, c.curriculum.end)
    except ValueError as e:
        raise ConfigError(f"config.curriculum: {e}") from None
    r = c.rollout
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
            num_minibatches=a.num_minibatches, micro_batch_size=a.micro_batch_size, loss=loss,
            advantage=adv, kl_in_reward=a.kl_in_reward, remat=c.remat,
            compute_dtype=c.compute_dtype)
        update.check_batch_size(c.prompts_per_step * r.samples_per_prompt)
    except ValueError as e:
        raise ConfigError(f"config.algorithm: {e}") from None
    for key in ("lr", "critic_lr"):
        _check(c.optim[key] > 0, f"optim.{key}", c.optim[key], "> 0")
    for key in ("warmup_ratio", "critic_warmup_ratio"):
        _check(0 <= c.optim[key] <= 1, f"optim.{key}", c.optim[key], "in [0, 1]")
    return Settings(rollout, update, sampler, schedule, tuple(int(x) for x in c.mesh.shape))


def make_mesh(shape: tuple[int, int, int]) -> jax.sharding.Mesh:
    devices = jax.devices()
    shape = list(shape)
    if shape.count(-1) > 1:
        raise ConfigError(f"config.mesh.shape = {tuple(shape)}: at most one -1")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ConfigError(f"config.mesh.shape = {tuple(shape)} needs {int(np.prod(shape))} "
                          f"devices, have {len(devices)}")
    return jax.sharding.Mesh(np.array(devices).reshape(shape), ("data", "fsdp", "tensor"))


# ----------------------------------------------------------------------------------------------
# Data and engines.
# ----------------------------------------------------------------------------------------------


def load_examples(spec: str, c: ml_collections.ConfigDict) -> list[qa.QAExample]:
    """`synthetic:<split>`, or comma-separated files / `hf:` ids (e.g. NQ + HotpotQA)."""
    out: list[qa.QAExample] = []
    for part in (s.strip() for s in spec.split(",") if s.strip()):
        if part.startswith("synthetic:"):
            world = synthetic.build_world(synthetic.WorldConfig(seed=c.data.synthetic_seed))
            out += world.questions(part.split(":", 1)[1])
        else:
            out += qa.load_qa(part, on_error=c.data.on_error)
    if not out:
        raise ConfigError(f"no questions in {spec!r}")
    return out


def _world_passages(c) -> list[search.Passage]:
    world = synthetic.build_world(synthetic.WorldConfig(seed=c.data.synthetic_seed))
    return [search.Passage.from_contents(p["id"], p["contents"]) for p in world.passages]


def make_validation_engine(c: ml_collections.ConfigDict) -> search.SearchEngine:
    v = c.validation
    if v.engine == "bm25":
        passages = (_world_passages(c) if not v.corpus else search.load_corpus(v.corpus))
        return search.BM25SearchEngine.build(passages, topk=v.topk)
    if v.engine == "searchr1":
        return search.SearchR1RetrieverClient(v.url, topk=v.topk)
    return search.SerpAPIClient(topk=v.topk)


def make_training_engine(c: ml_collections.ConfigDict, policy: tuple, tokenizer: Tokenizer):
    s = c.simulator
    if s.kind == "llm":
        if s.model == c.policy:  # the same (frozen, compute-dtype) weights as the reference
            config, params = policy
        else:
            config, params = models.load_pretrained(s.model, dtype=jnp.dtype(c.compute_dtype))
            tokenizer = Tokenizer.from_pretrained(s.model)
        return search.LLMSimulator(
            config, params, tokenizer, variant=s.variant, topk=s.topk,
            temperature=s.temperature, max_new_tokens=s.max_new_tokens,
            prime_reply=s.prime_reply, seed=c.seed)
    if s.kind == "server":
        return search.SimulatorServerClient(s.url, variant=s.variant, topk=s.topk,
                                            temperature=s.temperature,
                                            max_new_tokens=s.max_new_tokens, seed=c.seed)
    if s.kind == "searchr1":  # Search-R1 style: train with a real engine.
        return search.SearchR1RetrieverClient(s.url, topk=c.validation.topk)
    return search.BM25SearchEngine.build(_world_passages(c), topk=c.validation.topk)


# ----------------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------------


def validate(config, params, tokenizer, examples, engine, settings: Settings, seed: int):
    """Greedy episodes on the validation questions: EM / cover EM / F1, overall and per source."""
    rc = dataclasses.replace(settings.rollout, samples_per_prompt=1)
    _, stats = agent.rollout(config, params, tokenizer, examples, engine, rollout_config=rc,
                             sampler=sampling.Greedy(), rng=seed)
    out = {"f1": float(stats.f1.mean()), "em": float(stats.em.mean()),
           "cover_em": float(stats.cover_em.mean()), "searches": float(stats.searches.mean())}
    sources = np.array([e.data_source for e in examples])
    for src in sorted(set(sources)):
        sel = sources == src
        out[f"{src}/f1"] = float(stats.f1[sel].mean())
        out[f"{src}/cover_em"] = float(stats.cover_em[sel].mean())
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
            ("tokens", "attention_mask", "positions", "loss_mask", "rewards", "group")}


def train(c: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Runs (or resumes) training; returns the final validation metrics."""
    settings = build_settings(c)  # every config check, before any work

    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from zerosearch_jax.metrics import MetricsWriter
    from zerosearch_jax.plot import plot_run

    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(c.to_json_best_effort(indent=2))
    mesh = make_mesh(settings.mesh_shape)

    # -- models ---------------------------------------------------------------------------------
    # Master weights (and Adam moments) in param_dtype; rollouts, the frozen reference and the
    # simulator hold compute_dtype copies (a cast per step is far cheaper than casting every
    # weight at every decode step).
    compute = jnp.dtype(c.compute_dtype)
    tokenizer = Tokenizer.from_pretrained(c.tokenizer or c.policy)
    model_config, params = models.load_pretrained(c.policy, dtype=jnp.dtype(c.param_dtype))
    to_compute = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(compute), p))
    ref_params = to_compute(params)  # the frozen initial policy
    train_engine = make_training_engine(c, (model_config, ref_params), tokenizer)
    val_engine = make_validation_engine(c)

    uc = settings.update
    total = c.total_steps
    actor_opt = ts.make_optimizer(c.optim.lr, total, c.optim.warmup_ratio,
                                  (c.optim.b1, c.optim.b2), c.optim.weight_decay,
                                  c.optim.grad_clip)
    critic_opt = (ts.make_optimizer(c.optim.critic_lr, total, c.optim.critic_warmup_ratio,
                                    (c.optim.b1, c.optim.b2), c.optim.weight_decay,
                                    c.optim.grad_clip) if uc.uses_critic else None)
    fns = ts.make_train_fns(model_config, uc, actor_opt, critic_opt, mesh=mesh)
    critic = (ts.init_critic(model_config, params, jax.random.key(c.seed))
              if uc.uses_critic else None)
    state = fns.init_state(params, critic)
    del params, critic

    # -- data -----------------------------------------------------------------------------------
    train_examples = load_examples(c.data.train, c)
    val_examples = qa.sample(load_examples(c.data.validation, c), c.data.validation_size,
                             seed=c.seed)
    data = DataIterator(train_examples, seed=c.seed)

    # -- resume ---------------------------------------------------------------------------------
    ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=c.checkpoint.keep, create=True))
    writer = MetricsWriter(workdir, enabled=is_main)
    start = 0
    if manager.latest_step() is not None:
        step0 = manager.latest_step()
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                state, fns.state_sharding)
        restored = manager.restore(step0, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        state = restored["state"]
        data.restore(restored["meta"]["data"])
        start = int(restored["meta"]["step"])
        writer.truncate_after(start)
        logger.info("resumed from %s at step %d", ckpt_dir, start)

    def save(step: int):
        meta = {"step": step, "data": data.state(), "seed": c.seed}
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)
        manager.wait_until_finished()

    preempted = _Preempted()
    base_key = jax.random.key(c.seed)
    val_metrics: dict[str, float] = {}
    if start == 0:
        val_metrics = validate(model_config, to_compute(state.params), tokenizer, val_examples,
                               val_engine, settings, c.seed)
        writer.write(0, val_metrics, prefix="val/")
        logger.info("validation before training: %s", _fmt(val_metrics))

    # Fixed batch shapes, so scoring and the update compile once: the response length is the
    # longest possible episode; the prompt length only grows (to the next bucket) if a longer
    # prompt shows up.
    rc = settings.rollout
    response_length = -(-((rc.max_turns + 1) * rc.max_new_tokens
                          + rc.max_turns * rc.max_obs_tokens) // 64) * 64
    prompt_length = 0
    nonfinite_streak = 0
    bar = tqdm(range(start, total), initial=start, total=total, desc="train", disable=not is_main,
               dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        key = jax.random.fold_in(base_key, step)
        p_noise = settings.schedule(step + 1, total, c.curriculum.start, c.curriculum.end)
        if hasattr(train_engine, "reseed"):
            train_engine.reseed(c.seed * 1_000_003 + step)
        questions = data.next_batch(c.prompts_per_step)
        prompt_length = max(prompt_length, sampling.bucket_length(max(
            len(agent.prompt_ids(tokenizer, q.question, rc.chat_template)) for q in questions)))
        batch, stats = agent.rollout(model_config, to_compute(state.params), tokenizer, questions,
                                     train_engine, rollout_config=settings.rollout,
                                     sampler=settings.sampler, rng=key,
                                     noise_probability=p_noise,
                                     batch_lengths=(prompt_length, response_length))
        t_rollout = time.perf_counter() - t0
        t1 = time.perf_counter()
        scored = fns.score(state.params, ref_params, state.critic_params, _batch_dict(batch))
        state, update_metrics = fns.update(state, scored, jax.random.fold_in(key, 1))
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

        response_tokens = float(batch.attention_mask[:, batch.prompt_length:].sum(1).mean())
        step_tokens = float(batch.attention_mask.sum())
        metrics = {**stats.summary(), "curriculum/noise_probability": p_noise,
                   "episode/response_tokens": response_tokens,
                   **{f"train/{k}": v for k, v in update_metrics.items()},
                   "throughput/rollout_tokens_per_s": stats.generated_tokens / t_rollout,
                   "throughput/update_tokens_per_s": step_tokens / t_update,
                   "time/rollout_s": t_rollout, "time/update_s": t_update,
                   "data/epoch": data.epoch}
        done = step + 1
        if done % c.validation.every == 0 or done == total:
            val_metrics = validate(model_config, to_compute(state.params), tokenizer,
                                   val_examples, val_engine, settings, c.seed)
            metrics.update({f"val/{k}": v for k, v in val_metrics.items()})
        writer.write(done, metrics)
        bar.set_postfix(f1=f"{metrics['reward/f1']:.3f}", p=f"{p_noise:.2f}",
                        kl=f"{update_metrics.get('kl_loss', 0.0):.4f}")
        # A step whose update was skipped is not saved: the last checkpoint stays the last good one.
        if (done % c.checkpoint.every == 0 or done == total or preempted.flag) \
                and not nonfinite_streak:
            save(done)
        if preempted.flag:
            logger.warning("preempted: checkpoint saved at step %d; exiting", done)
            writer.close()
            sys.exit(0)

    writer.close()
    if is_main:
        plot_run(workdir)
        if c.export_hf:
            models.save_pretrained(model_config, jax.device_get(state.params),
                                   os.path.join(workdir, "hf_policy"), tokenizer=tokenizer)
        with open(os.path.join(workdir, "final_validation.json"), "w") as f:
            json.dump(val_metrics, f, indent=2)
    return val_metrics


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

    def run(_):
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        for noisy in ("absl", "jax._src", "bm25s", "orbax", "httpx"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
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
