"""The RL update: log-probs, advantages, and the jitted PPO-style train step.

Host and device meet at three pure functions, each jitted once per shape:

- `score_batch`: old log-probs (the current policy), reference log-probs (the frozen initial
  policy), critic values, then advantages/returns by the configured estimator. Every log-prob
  here and in the update is taken at the rollout's sampling temperature (logits / T, as veRL),
  so on-policy the importance ratio is 1 whatever the temperature.
- `update`: `ppo_epochs` x `num_minibatches` optimizer steps; each mini-batch's gradient is
  accumulated over micro-batches with `lax.scan`, every loss a (sum, count) pair divided once
  by the mini-batch's token count, so the result does not depend on the micro-batch size.
- A non-finite loss or gradient skips that optimizer step (parameters and optimizer state are
  kept) and is reported in the metrics as `nonfinite`; the training loop stops after too many.

`make_train_fns` closes over the static pieces (configs, optimizers, shardings) and returns
jitted functions with explicit in/out shardings and donated state, PureJaxRL style.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from zerosearch_jax import models
from zerosearch_jax.rl import algorithms as algo
from zerosearch_jax.sharding import DEFAULT_RULES, Placement

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """How one rollout batch becomes optimizer steps (REFERENCE section 7 defaults)."""

    advantage_estimator: str = "reinforce"  # one of rl.ADVANTAGE_ESTIMATORS.
    ppo_epochs: int = 1  # passes over the batch.
    num_minibatches: int = 1  # optimizer steps per epoch.
    micro_batch_size: int = 4  # rows per forward/backward (gradient accumulation).
    loss: algo.LossConfig = algo.LossConfig()
    advantage: algo.AdvantageConfig = algo.AdvantageConfig()
    kl_in_reward: bool = False  # PPO: subtract kl_coef * KL from the token rewards.
    temperature: float = 1.0  # the rollout's sampling temperature; log-probs use logits / T.
    remat: bool = True  # rematerialize transformer blocks in the backward pass.
    # Matmul input dtype; None = the parameters' own. "bfloat16" with float32 parameters is
    # the usual mixed precision: float32 master weights and optimizer moments (a 1e-6 step
    # is below bfloat16's resolution), bfloat16 products with float32 accumulation.
    compute_dtype: str | None = None

    def __post_init__(self):
        if self.advantage_estimator not in algo.ADVANTAGE_ESTIMATORS:
            raise ValueError(f"unknown advantage_estimator {self.advantage_estimator!r}; valid "
                             f"names: {sorted(algo.ADVANTAGE_ESTIMATORS)}")
        for name in ("ppo_epochs", "num_minibatches", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @property
    def uses_critic(self) -> bool:
        return self.advantage_estimator == "gae"

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per RL step (the learning-rate schedule counts RL steps)."""
        return self.ppo_epochs * self.num_minibatches

    @property
    def needs_old_logprobs(self) -> bool:
        """False when the update is exactly on-policy (one epoch, one mini-batch: the old
        log-probs equal the current ones, so the ratio is 1): the update then takes them from
        its own forward pass, and a KL in the reward reads the rollout's own log-probs (the
        policy's at the sampling temperature), so scoring saves a forward pass."""
        return self.ppo_epochs > 1 or self.num_minibatches > 1

    def check_batch_size(self, batch_size: int) -> None:
        per_mini = batch_size // self.num_minibatches
        if batch_size % self.num_minibatches or per_mini % self.micro_batch_size:
            raise ValueError(
                f"batch of {batch_size} trajectories must split into num_minibatches="
                f"{self.num_minibatches} mini-batches of a multiple of micro_batch_size="
                f"{self.micro_batch_size} rows")


@flax.struct.dataclass
class TrainState:
    """Everything the update changes. critic_* are None without a critic."""

    step: Array
    params: Any
    opt_state: Any
    critic_params: Any = None
    critic_opt_state: Any = None


def lr_schedule(learning_rate: float, total_steps: int, warmup_ratio: float = 0.0,
                updates_per_step: int = 1) -> optax.Schedule:
    """Linear warm-up from 0 over `int(warmup_ratio * total_steps)` steps, then constant
    (veRL's `get_constant_schedule_with_warmup`), as a function of the optimizer's update count.

    Steps are RL steps, as veRL steps its scheduler once per RL step: an RL step that makes
    `updates_per_step` optimizer updates (mini-batches x PPO epochs) keeps one rate for all of
    them, so the warm-up lasts the configured number of RL steps whatever the batching.
    """
    warmup = int(warmup_ratio * total_steps)

    def schedule(count):
        step = count // updates_per_step
        if warmup <= 0:
            return jnp.full_like(step, learning_rate, dtype=jnp.float32)
        return learning_rate * jnp.minimum(step / warmup, 1.0).astype(jnp.float32)

    return schedule


def make_optimizer(learning_rate: float, total_steps: int, warmup_ratio: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.01,
                   grad_clip: float = 1.0, updates_per_step: int = 1
                   ) -> optax.GradientTransformation:
    """AdamW on `lr_schedule` (warm-up in steps of `updates_per_step` updates), after global-norm
    gradient clipping (veRL's actor/critic optimizer)."""
    schedule = lr_schedule(learning_rate, total_steps, warmup_ratio, updates_per_step)
    return optax.chain(optax.clip_by_global_norm(grad_clip),
                       optax.adamw(schedule, b1=betas[0], b2=betas[1], weight_decay=weight_decay))


# ----------------------------------------------------------------------------------------------
# Model heads: token log-probs / entropy for the policy, values for the critic.
# ----------------------------------------------------------------------------------------------


def _shift_right(x: Array) -> Array:
    """Entry t <- entry t-1 (entry 0 <- 0): quantities computed at the position that predicts
    token t are indexed by token t, like the rollout's log-probs and loss mask."""
    return jnp.pad(x[:, :-1], [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2))


def _hidden(config: models.ModelConfig, params, tokens, attention_mask, positions, remat=False,
            dtype=None):
    mask = attention_mask.astype(bool)
    out, _ = models.Transformer(config, remat=remat, dtype=dtype).apply(
        {"params": params}, tokens, positions, models.causal_attention_mask(mask),
        return_hidden=True)
    return out


def policy_logprobs(config: models.ModelConfig, params, tokens: Array, attention_mask: Array,
                    positions: Array, temperature: float = 1.0, remat: bool = False,
                    dtype=None) -> tuple[Array, Array]:
    """(log p(tokens[t] | tokens[<t]) [B, T], entropy of that distribution [B, T]), float32.

    Entry 0 of both is 0 (nothing predicts the first token). dtype: matmul input dtype.
    """
    hidden = _hidden(config, params, tokens, attention_mask, positions, remat, dtype)
    head = models.head_weight(config, params)
    # Position t predicts token t + 1; the last position predicts nothing (its target is a
    # dummy and its value is shifted out).
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    logp, entropy = algo.head_logprobs_entropy(
        hidden, head, targets, jnp.dtype(dtype or head.dtype), float(temperature))
    return _shift_right(logp), _shift_right(entropy)


def init_critic(config: models.ModelConfig, policy_params, rng: Array) -> dict:
    """A critic initialised from the policy: the same backbone plus a scalar value head."""
    backbone = {k: v for k, v in policy_params.items() if k != "lm_head"}
    w = 0.02 * jax.random.normal(rng, (config.hidden_size,), jnp.float32)
    return {"backbone": jax.tree.map(jnp.copy, backbone),
            "value_head": {"w": w.astype(jax.tree.leaves(policy_params)[0].dtype),
                           "b": jnp.zeros((), jnp.float32)}}


def critic_values(config: models.ModelConfig, critic_params, tokens, attention_mask, positions,
                  remat: bool = False, dtype=None) -> Array:
    """V(state before token t) [B, T] float32, indexed like the log-probs."""
    hidden = _hidden(config, critic_params["backbone"], tokens, attention_mask, positions, remat,
                     dtype)
    head = critic_params["value_head"]
    v = jnp.einsum("bte,e->bt", hidden, head["w"].astype(jnp.float32)) + head["b"]
    return _shift_right(v)


def critic_logical_axes(config: models.ModelConfig):
    axes = {k: v for k, v in models.param_logical_axes(config).items() if k != "lm_head"}
    P = jax.sharding.PartitionSpec
    return {"backbone": axes, "value_head": {"w": P("embed"), "b": P()}}


# ----------------------------------------------------------------------------------------------
# Batch scoring and the update.
# ----------------------------------------------------------------------------------------------


def _micro_map(fn: Callable, n_micro: int, *arrays):
    """Applies fn to micro-batches (rows i, i + n, i + 2n, ...), concatenating the outputs.

    Interleaved rows keep a batch sharded over devices along rows sharded inside each
    micro-batch, so every device works on every micro-batch.
    """
    def split(x):
        return x.reshape(-1, n_micro, *x.shape[1:]).swapaxes(0, 1)

    def merge(y):
        return y.swapaxes(0, 1).reshape(-1, *y.shape[2:])

    out = jax.lax.map(lambda xs: fn(*xs), tuple(split(a) for a in arrays))
    return jax.tree.map(merge, out)


def score_batch(config: models.ModelConfig, uc: UpdateConfig, params, ref_params, critic_params,
                batch: dict) -> dict:
    """Adds ref_logprobs, old_logprobs (if `uc.needs_old_logprobs`), old_values (with a
    critic), advantages, returns and token_kl to `batch`.

    batch: tokens, attention_mask, positions, loss_mask, rewards [B, T]; group [B]; logprobs
    [B, T] (the rollout's, needed for a KL in the reward when there are no old log-probs).
    """
    B = batch["tokens"].shape[0]
    n_micro = max(B // uc.micro_batch_size, 1)
    seq = (batch["tokens"], batch["attention_mask"], batch["positions"])

    dtype = uc.compute_dtype

    def logp_fn(p):
        return _micro_map(lambda *s: policy_logprobs(config, p, *s, uc.temperature,
                                                     dtype=dtype)[0], n_micro, *seq)

    out = dict(batch)
    mask = batch["loss_mask"]
    out["ref_logprobs"] = logp_fn(ref_params if ref_params is not None else params)
    token_kl = jnp.zeros_like(mask)
    if uc.needs_old_logprobs:
        out["old_logprobs"] = logp_fn(params)
    if uc.kl_in_reward:
        current = out["old_logprobs"] if uc.needs_old_logprobs else batch["logprobs"]
        token_kl = algo.get_kl_estimator(uc.loss.kl_estimator)(current, out["ref_logprobs"])
    values = None
    if critic_params is not None:
        values = _micro_map(lambda *s: critic_values(config, critic_params, *s, dtype=dtype),
                            n_micro, *seq)
        out["old_values"] = values
    estimator = algo.get_advantage_estimator(uc.advantage_estimator)
    # token_kl is zero unless kl_in_reward, so the reward carries no KL otherwise.
    adv, ret = estimator(batch["rewards"], mask, group_ids=batch["group"], values=values,
                         token_kl=token_kl * mask, config=uc.advantage)
    out["advantages"], out["returns"] = adv, ret
    out["token_kl"] = token_kl * mask
    return out


def _accumulate(loss_fn: Callable, params, micro_batches: dict, n_micro: int):
    """Sum of grads (float32) and metric sums of loss_fn over micro-batches (a lax.scan)."""
    def step(carry, mb):
        grads, metrics = carry
        (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
        grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
        return (grads, jax.tree.map(jnp.add, metrics, m)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    metric_zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        lambda: loss_fn(params, first)[1]))
    (grads, metrics), _ = jax.lax.scan(step, (zeros, metric_zeros), micro_batches,
                                       length=n_micro)
    return grads, metrics


def _apply_if_finite(optimizer, grads, params, opt_state, loss, grad_norm=None):
    """One optimizer step, skipped (state kept) if the loss or any gradient is not finite.

    Finiteness is read from the global gradient norm (a nan or inf anywhere makes it
    non-finite; so does a norm beyond float32's range, which no step should take either), and
    the skip is a `lax.cond`: a per-leaf `where` between the old and new parameters and
    moments would cost three extra passes over them every step.
    """
    grad_norm = optax.global_norm(grads) if grad_norm is None else grad_norm
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def step(operands):
        grads, params, opt_state = operands
        updates, new_opt = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt

    def skip(operands):
        _, params, opt_state = operands
        return params, opt_state

    new_params, new_opt = jax.lax.cond(finite, step, skip, (grads, params, opt_state))
    return new_params, new_opt, finite


def update(config: models.ModelConfig, uc: UpdateConfig, actor_opt, critic_opt,
           state: TrainState, batch: dict, rng: Array) -> tuple[TrainState, dict]:
    """ppo_epochs x num_minibatches optimizer steps on a scored batch. Pure; jit it."""
    B = batch["tokens"].shape[0]
    mini = B // uc.num_minibatches
    n_micro = mini // uc.micro_batch_size
    keys = ("tokens", "attention_mask", "positions", "loss_mask", "ref_logprobs", "advantages")
    if "old_logprobs" in batch:
        keys += ("old_logprobs",)
    if state.critic_params is not None:
        keys += ("old_values", "returns")

    def actor_loss(params, mb, count):
        logp, entropy = policy_logprobs(config, params, mb["tokens"], mb["attention_mask"],
                                        mb["positions"], uc.temperature, remat=uc.remat,
                                        dtype=uc.compute_dtype)
        use_ref = uc.loss.use_kl_loss or uc.kl_in_reward
        old = mb["old_logprobs"] if "old_logprobs" in mb else jax.lax.stop_gradient(logp)
        total, _, metrics = algo.ppo_actor_loss(
            logp, old, mb["ref_logprobs"] if use_ref else None,
            mb["advantages"], mb["loss_mask"], entropy, uc.loss)
        return total / count, metrics

    def critic_loss(cparams, mb, count):
        v = critic_values(config, cparams, mb["tokens"], mb["attention_mask"], mb["positions"],
                          remat=uc.remat, dtype=uc.compute_dtype)
        total, _ = algo.value_loss(v, mb["old_values"], mb["returns"], mb["loss_mask"],
                                   uc.loss.value_clip)
        return total / count, {"vf_loss": total}

    def minibatch_step(state: TrainState, idx):
        mb = {k: batch[k][idx] for k in keys}
        count = jnp.maximum(mb["loss_mask"].sum(), 1.0)
        micro = jax.tree.map(
            lambda x: x.reshape(-1, n_micro, *x.shape[1:]).swapaxes(0, 1), mb)
        grads, metrics = _accumulate(lambda p, m: actor_loss(p, m, count), state.params, micro,
                                     n_micro)
        metrics = {k: v / count for k, v in metrics.items()}
        metrics["grad_norm"] = optax.global_norm(grads)
        params, opt_state, finite = _apply_if_finite(actor_opt, grads, state.params,
                                                     state.opt_state, metrics["loss"],
                                                     metrics["grad_norm"])
        metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
        critic_params, critic_opt_state = state.critic_params, state.critic_opt_state
        if critic_params is not None:
            cgrads, cm = _accumulate(lambda p, m: critic_loss(p, m, count), critic_params,
                                     micro, n_micro)
            metrics["vf_loss"] = cm["vf_loss"] / count
            metrics["critic_grad_norm"] = optax.global_norm(cgrads)
            critic_params, critic_opt_state, cfinite = _apply_if_finite(
                critic_opt, cgrads, critic_params, critic_opt_state, metrics["vf_loss"],
                metrics["critic_grad_norm"])
            metrics["nonfinite"] = jnp.maximum(metrics["nonfinite"], 1.0 - cfinite)
        return TrainState(state.step, params, opt_state, critic_params, critic_opt_state), metrics

    def epoch(state, key):
        perm = jax.random.permutation(key, B).reshape(uc.num_minibatches, mini)
        return jax.lax.scan(minibatch_step, state, perm)

    state, metrics = jax.lax.scan(epoch, state, jax.random.split(rng, uc.ppo_epochs))
    metrics = jax.tree.map(lambda x: x.reshape(-1), metrics)
    summary = {k: jnp.mean(v) for k, v in metrics.items()}
    summary["nonfinite"] = jnp.sum(metrics["nonfinite"])
    return state.replace(step=state.step + 1), summary


# ----------------------------------------------------------------------------------------------
# Jitted entry points with explicit shardings.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainFns:
    """The jitted functions of one training run and the shardings they use."""

    init_state: Callable  # (params, critic_params | None) -> TrainState
    score: Callable  # (params, ref_params, critic_params, batch) -> scored batch
    update: Callable  # (state, scored batch, rng) -> (state, metrics)
    param_sharding: Any
    critic_sharding: Any
    state_sharding: Any
    batch_sharding: Any  # (array) -> its NamedSharding
    placement: Placement


def make_train_fns(config: models.ModelConfig, uc: UpdateConfig, actor_opt, critic_opt=None,
                   mesh: jax.sharding.Mesh | None = None, rules=DEFAULT_RULES) -> TrainFns:
    """Builds the jitted init / score / update functions.

    With a mesh, parameters are placed by their logical axes (`rules`), optimizer states like
    their parameters, and [B, ...] batch arrays split along ("data", "fsdp"); the state is
    donated to `update`. Without a mesh everything lives on the default device.
    """
    if uc.uses_critic and critic_opt is None:
        raise ValueError("the gae estimator (PPO) needs a critic optimizer")
    if mesh is None:
        mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
        rules = (("batch", "data"),)
    placement = Placement(mesh, tuple(rules))
    param_sharding = placement.param_shardings(config)
    critic_sharding = None
    if uc.uses_critic:
        critic_shapes = jax.eval_shape(lambda p: init_critic(config, p, jax.random.key(0)),
                                       models.param_shapes(config))
        critic_sharding = placement.param_shardings(config, critic_logical_axes(config),
                                                    critic_shapes)
    replicated = placement.replicated()

    def batch_spec(x):
        return placement.batch_sharding(x.ndim)

    def opt_sharding(opt, params_sharding):
        shapes = jax.eval_shape(opt.init, jax.tree.map(
            lambda s: jax.ShapeDtypeStruct((1,), jnp.float32), params_sharding))
        return optax.tree_map_params(opt, lambda _, s: s, shapes, params_sharding,
                                     transform_non_params=lambda _: replicated)

    state_sharding = TrainState(
        step=replicated, params=param_sharding, opt_state=opt_sharding(actor_opt, param_sharding),
        critic_params=critic_sharding,
        critic_opt_state=opt_sharding(critic_opt, critic_sharding) if uc.uses_critic else None)

    @jax.jit
    def _init(params, critic_params):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=actor_opt.init(params), critic_params=critic_params,
                          critic_opt_state=None if critic_params is None
                          else critic_opt.init(critic_params))

    def init_state(params, critic_params=None):
        # Built where the inputs are (this process's devices), then placed: on several
        # processes `put` assembles the global arrays from every process's identical copy.
        state = _init(params, critic_params)
        return placement.put(state, state_sharding)

    jitted: dict = {}

    def score(params, ref_params, critic_params, batch):
        key = ("score", tuple(sorted(batch)), ref_params is None, critic_params is None)
        if key not in jitted:
            fn = functools.partial(score_batch, config, uc)
            # Scored arrays leave split along rows, exactly as `update` takes them (left to
            # propagation, a micro-batch reshape can hand back replicated rows).
            out = jax.eval_shape(fn, params, ref_params, critic_params, batch)
            jitted[key] = jax.jit(
                fn, in_shardings=(param_sharding, None if ref_params is None else param_sharding,
                                  critic_sharding, jax.tree.map(batch_spec, batch)),
                out_shardings=jax.tree.map(batch_spec, out))
        return jitted[key](params, ref_params, critic_params, batch)

    def update_fn(state, batch, rng):
        key = ("update", tuple(sorted(batch)))
        if key not in jitted:
            jitted[key] = jax.jit(
                functools.partial(update, config, uc, actor_opt, critic_opt),
                in_shardings=(state_sharding, jax.tree.map(batch_spec, batch), replicated),
                out_shardings=(state_sharding, replicated), donate_argnums=(0,))
        return jitted[key](state, batch, rng)

    return TrainFns(init_state, score, update_fn, param_sharding, critic_sharding,
                    state_sharding, batch_spec, placement)
