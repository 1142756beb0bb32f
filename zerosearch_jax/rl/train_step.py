"""The RL update: log-probs, advantages, and the jitted PPO-style train step.

Host and device meet at three pure functions, each jitted once per run:

- `packing.plan` (host, with `UpdateConfig.packing`): where each real token of the [B, T] rollout
  batch goes in fixed-shape packed micro-batches (several episodes a row, a GRPO group's
  prompt once), and which episodes form each PPO epoch's mini-batches.
- `score_batch`: old log-probs (the current policy), reference log-probs (the frozen initial
  policy), critic values, all on the packed rows and scattered back to [B, T], then
  advantages/returns by the configured estimator; one `Scored` struct out. Every log-prob
  here and in the update is taken at the rollout's sampling temperature (logits / T, as veRL),
  so on-policy the importance ratio is 1 whatever the temperature.
- `update`: `ppo_epochs` x `num_minibatches` optimizer steps; each mini-batch's gradient is
  accumulated over its packed micro-batches (a loop over those in use), every loss a (sum,
  count) pair divided once by the mini-batch's token count, so the result depends on neither
  the packing nor the micro-batch size.
- A non-finite loss or gradient skips that optimizer step (parameters and optimizer state are
  kept) and is reported in the metrics as `nonfinite`; the training loop stops after too many.

`make_train_fns` closes over the static pieces (configs, optimizers, shardings) and returns
jitted functions with explicit shardings and donated state, PureJaxRL style. The generic pieces
(`TrainState`, `make_optimizer`, `apply_if_finite`, `policy_logprobs`, `accumulate`) are in
`training`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from zerosearch_jax import models, packing, training
from zerosearch_jax.rl import algorithms as algo
from zerosearch_jax.sharding import DEFAULT_RULES, Placement

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """How one rollout batch becomes optimizer steps (docs/method.md §7 defaults)."""

    advantage_estimator: str = "reinforce"  # one of rl.ADVANTAGE_ESTIMATORS.
    ppo_epochs: int = 1  # passes over the batch.
    num_minibatches: int = 1  # optimizer steps per epoch.
    micro_batch_size: int = 4  # rows per forward/backward (gradient accumulation).
    loss: algo.LossConfig = algo.LossConfig()
    advantage: algo.AdvantageConfig = algo.AdvantageConfig()
    kl_in_reward: bool = False  # PPO: subtract loss.kl_coef * KL from the token rewards.
    temperature: float = 1.0  # the rollout's sampling temperature; log-probs use logits / T.
    # Train only on the policy's own tokens (the method's loss mask). False is the paper's
    # ablation: every response token, inserted documents and messages included, is trained on.
    mask_observations: bool = True
    # Tokens per packed row (several episodes a row, attention kept within each; packing.py):
    # micro_batch_size then counts packed rows. 0: one episode per row of the batch's length.
    pack_length: int = 0
    remat: bool = True  # rematerialize transformer blocks in the backward pass.
    # Matmul input dtype; None = the parameters' own. "bfloat16" with float32 parameters is
    # the usual mixed precision: float32 master weights and optimizer moments (a 1e-6 step
    # is below bfloat16's resolution), bfloat16 products with float32 accumulation.
    compute_dtype: str | None = None

    def __post_init__(self):
        if self.advantage_estimator not in algo.ADVANTAGE_ESTIMATORS:
            raise ValueError(f"unknown advantage_estimator {self.advantage_estimator!r}; valid "
                             f"names: {sorted(algo.ADVANTAGE_ESTIMATORS)}")
        if self.pack_length < 0:
            raise ValueError(f"pack_length must be >= 0 (0: no packing), got {self.pack_length}")
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
        # Without the loss mask the observation tokens are trained on too, and the rollout
        # recorded no log-probs for them: a KL in the reward needs scoring's.
        return (self.ppo_epochs > 1 or self.num_minibatches > 1
                or (self.kl_in_reward and not self.mask_observations))

    @property
    def packing_args(self) -> dict[str, int]:
        """This update's arguments to `packing.plan` (rows per micro-batch, row length,
        mini-batches, epochs): `packing.plan(mask, seed=..., **uc.packing_args)`."""
        return dict(rows=self.micro_batch_size, row_length=self.pack_length,
                    num_minibatches=self.num_minibatches, ppo_epochs=self.ppo_epochs)

    def check_batch_size(self, batch_size: int) -> None:
        per_mini = batch_size // self.num_minibatches
        if batch_size % self.num_minibatches or (
                not self.pack_length and per_mini % self.micro_batch_size):
            raise ValueError(
                f"batch of {batch_size} trajectories must split into num_minibatches="
                f"{self.num_minibatches} mini-batches of a multiple of micro_batch_size="
                f"{self.micro_batch_size} rows")


# ----------------------------------------------------------------------------------------------
# The critic: values from the policy's backbone (log-probs: `training.policy_logprobs`).
# ----------------------------------------------------------------------------------------------


def init_critic(config: models.ModelConfig, policy_params, rng: Array) -> dict:
    """A critic initialised from the policy: the same backbone plus a scalar value head."""
    backbone = {k: v for k, v in policy_params.items() if k != "lm_head"}
    w = 0.02 * jax.random.normal(rng, (config.hidden_size,), jnp.float32)
    return {"backbone": jax.tree.map(jnp.copy, backbone),
            "value_head": {"w": w.astype(jax.tree.leaves(policy_params)[0].dtype),
                           "b": jnp.zeros((), jnp.float32)}}


def critic_values(config: models.ModelConfig, critic_params, tokens, attention_mask, positions,
                  remat: bool = False, dtype=None, segment_ids: Array | None = None,
                  prefix_ids: Array | None = None) -> Array:
    """V(state before token t) [B, T] float32, indexed like the log-probs."""
    hidden = training.hidden_states(config, critic_params["backbone"], tokens, attention_mask,
                                    positions, remat, dtype, segment_ids, prefix_ids)
    head = critic_params["value_head"]
    v = jnp.einsum("bte,e->bt", hidden, head["w"].astype(jnp.float32)) + head["b"]
    return training.shift_right(v)


def critic_logical_axes(config: models.ModelConfig):
    axes = {k: v for k, v in models.param_logical_axes(config).items() if k != "lm_head"}
    P = jax.sharding.PartitionSpec
    return {"backbone": axes, "value_head": {"w": P("embed"), "b": P()}}


# ----------------------------------------------------------------------------------------------
# Batch scoring and the update.
# ----------------------------------------------------------------------------------------------


@flax.struct.dataclass
class Scored:
    """A scored batch, [B, T] each (the rollout's rows): what the update reads.

    tokens, positions, loss_mask  the rollout's
    ref_logprobs                  the frozen reference's log-probs
    advantages, returns           the estimator's (returns are zero without a critic's use)
    token_kl                      KL(policy || reference) per token, 0 unless kl_in_reward
    old_logprobs                  the current policy's, when `needs_old_logprobs`, else None
    old_values                    the critic's, with a critic, else None
    """

    tokens: Array
    positions: Array
    loss_mask: Array
    ref_logprobs: Array
    advantages: Array
    returns: Array
    token_kl: Array
    old_logprobs: Array | None = None
    old_values: Array | None = None


def _packed_map(fn: Callable, layout: packing.Layout, tokens: Array, positions: Array,
                mask: Array) -> Array:
    """fn(tokens, positions, segment_ids, prefix_ids, mask) [R, L] -> [R, L] over the layout's
    score micro-batches in use, scattered back to the batch's [B, T]."""
    index, segment, prefix = layout.score_index, layout.score_segment, layout.score_prefix
    tok, pos, msk = (packing.gather(x, index, segment) for x in (tokens, positions, mask))
    out = jnp.zeros(index.shape, jnp.float32)

    def body(i, out):
        return out.at[i].set(fn(tok[i], pos[i], segment[i], prefix[i], msk[i]))

    return packing.unpack(jax.lax.fori_loop(0, layout.score_used, body, out), layout)


def score_batch(config: models.ModelConfig, uc: UpdateConfig, params, ref_params, critic_params,
                batch: dict, layout: packing.Layout) -> Scored:
    """Reference log-probs, old log-probs (if `uc.needs_old_logprobs`), critic values (with a
    critic), then advantages and returns by the configured estimator.

    batch: tokens, attention_mask, positions, loss_mask, rewards [B, T]; group [B]; logprobs
    [B, T] (the rollout's, needed for a KL in the reward when there are no old log-probs). The
    forward passes run on the layout's packed micro-batches; the estimators on [B, T].
    """
    dtype = uc.compute_dtype
    layout = jax.tree.map(jnp.asarray, layout)  # a host plan works too, outside jit
    mask = batch["loss_mask"] if uc.mask_observations else response_mask(
        batch["loss_mask"], batch["attention_mask"])
    seq = (batch["tokens"], batch["positions"], mask)

    def logp_fn(p):  # read under the loss mask only: the head runs on its positions
        return _packed_map(lambda t, pos, seg, pre, m: training.policy_logprobs(
            config, p, t, None, pos, uc.temperature, dtype=dtype, segment_ids=seg,
            prefix_ids=pre, needed=m)[0], layout, *seq)
    ref = logp_fn(ref_params if ref_params is not None else params)
    old = logp_fn(params) if uc.needs_old_logprobs else None
    token_kl = jnp.zeros_like(mask)
    if uc.kl_in_reward:
        current = old if uc.needs_old_logprobs else batch["logprobs"]
        token_kl = algo.get_kl_estimator(uc.loss.kl_estimator)(current, ref) * mask
    values = None
    if critic_params is not None:
        values = _packed_map(lambda t, pos, seg, pre, _: critic_values(
            config, critic_params, t, None, pos, dtype=dtype, segment_ids=seg, prefix_ids=pre),
            layout, *seq)
    estimator = algo.get_advantage_estimator(uc.advantage_estimator)
    # token_kl is zero unless kl_in_reward, so the reward carries no KL otherwise; kl_coef is
    # the loss config's (one coefficient for the KL wherever it goes).
    adv, ret = estimator(batch["rewards"], mask, group_ids=batch["group"], values=values,
                         kl_penalty=uc.loss.kl_coef * token_kl, config=uc.advantage)
    return Scored(tokens=batch["tokens"], positions=batch["positions"], loss_mask=mask,
                  ref_logprobs=ref, advantages=adv, returns=ret, token_kl=token_kl,
                  old_logprobs=old, old_values=values)


def response_mask(loss_mask: Array, attention_mask: Array) -> Array:
    """Every real token from each row's first policy token on (observations included):
    the loss mask of the no-masking ablation. [B, T] -> [B, T] float32; a row without policy
    tokens gets none."""
    loss_mask = jnp.asarray(loss_mask)
    first = jnp.argmax(loss_mask > 0, axis=1)
    after = jnp.arange(loss_mask.shape[1])[None] >= first[:, None]
    keep = after & (loss_mask > 0).any(axis=1, keepdims=True)
    return (keep & jnp.asarray(attention_mask, bool)).astype(jnp.float32)


def _loss_token_count(segment: Array, per_episode: Array) -> Array:
    """The loss tokens of a mini-batch: those of its episodes. segment [Mb, R, L] (b + 1 marks
    episode b; shared prompts, > B, hold none); per_episode [B] loss tokens. At least 1."""
    B = per_episode.shape[0]
    episode = jnp.where(segment <= B, segment, 0).reshape(-1)
    member = jnp.zeros(B + 1, jnp.float32).at[episode].set(1.0)[1:]
    return jnp.maximum(member @ per_episode, 1.0)


def update(config: models.ModelConfig, uc: UpdateConfig, actor_opt, critic_opt,
           state: training.TrainState, batch: Scored, layout: packing.Layout
           ) -> tuple[training.TrainState, dict]:
    """ppo_epochs x num_minibatches optimizer steps on a scored batch. Pure; jit it.

    Mini-batch n of epoch e is the layout's micro-batches update_*[e, n] (its episodes packed),
    gathered from the [B, T] arrays as the gradient loop reaches them. Every loss is a sum over
    the mini-batch's loss tokens divided by their count, whatever the packing.
    """
    layout = jax.tree.map(jnp.asarray, layout)
    per_episode = batch.loss_mask.sum(axis=1)  # [B]
    fields = {"tokens": batch.tokens, "positions": batch.positions, "loss_mask": batch.loss_mask,
              "ref_logprobs": batch.ref_logprobs, "advantages": batch.advantages,
              "old_logprobs": batch.old_logprobs}
    if state.critic_params is not None:
        fields["old_values"], fields["returns"] = batch.old_values, batch.returns
    fields = {k: v for k, v in fields.items() if v is not None}

    def actor_loss(params, mb, count):
        logp, entropy = training.policy_logprobs(
            config, params, mb["tokens"], None, mb["positions"], uc.temperature, remat=uc.remat,
            dtype=uc.compute_dtype, segment_ids=mb["segment"], prefix_ids=mb["prefix"],
            needed=mb["loss_mask"])
        use_ref = uc.loss.use_kl_loss or uc.kl_in_reward
        old = mb["old_logprobs"] if "old_logprobs" in mb else jax.lax.stop_gradient(logp)
        total, _, metrics = algo.ppo_actor_loss(
            logp, old, mb["ref_logprobs"] if use_ref else None,
            mb["advantages"], mb["loss_mask"], entropy, uc.loss)
        return total / count, metrics

    def critic_loss(cparams, mb, count):
        v = critic_values(config, cparams, mb["tokens"], None, mb["positions"], remat=uc.remat,
                          dtype=uc.compute_dtype, segment_ids=mb["segment"],
                          prefix_ids=mb["prefix"])
        total, _ = algo.value_loss(v, mb["old_values"], mb["returns"], mb["loss_mask"],
                                   uc.loss.value_clip)
        return total / count, {"vf_loss": total}

    def minibatch_step(state: training.TrainState, en):
        e, n = en
        index, segment = layout.update_index[e, n], layout.update_segment[e, n]
        prefix = layout.update_prefix[e, n]
        n_micro = layout.update_used[e, n]

        def micro_batch(i):
            mb = {k: packing.gather(v, index[i], segment[i]) for k, v in fields.items()}
            mb["segment"], mb["prefix"] = segment[i], prefix[i]
            return mb

        count = _loss_token_count(segment, per_episode)
        grads, metrics = training.accumulate(lambda p, m: actor_loss(p, m, count), state.params,
                                     micro_batch, n_micro)
        metrics = {k: v / count for k, v in metrics.items()}
        metrics["grad_norm"] = optax.global_norm(grads)
        params, opt_state, finite = training.apply_if_finite(actor_opt, grads, state.params,
                                                              state.opt_state, metrics["loss"],
                                                              metrics["grad_norm"])
        metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
        critic_params, critic_opt_state = state.critic_params, state.critic_opt_state
        if critic_params is not None:
            cgrads, cm = training.accumulate(lambda p, m: critic_loss(p, m, count), critic_params,
                                     micro_batch, n_micro)
            metrics["vf_loss"] = cm["vf_loss"] / count
            metrics["critic_grad_norm"] = optax.global_norm(cgrads)
            critic_params, critic_opt_state, cfinite = training.apply_if_finite(
                critic_opt, cgrads, critic_params, critic_opt_state, metrics["vf_loss"],
                metrics["critic_grad_norm"])
            metrics["nonfinite"] = jnp.maximum(metrics["nonfinite"], 1.0 - cfinite)
        return (training.TrainState(state.step, params, opt_state, critic_params,
                                    critic_opt_state), metrics)

    E, N = layout.update_used.shape
    steps = (jnp.repeat(jnp.arange(E), N), jnp.tile(jnp.arange(N), E))
    state, metrics = jax.lax.scan(minibatch_step, state, steps)
    summary = {k: jnp.mean(v) for k, v in metrics.items()}
    summary["nonfinite"] = jnp.sum(metrics["nonfinite"])
    return state.replace(step=state.step + 1), summary


# ----------------------------------------------------------------------------------------------
# Jitted entry points with explicit shardings.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainFns:
    """The jitted functions of one training run and the shardings they use."""

    init_state: Callable  # (params, critic_params | None) -> training.TrainState
    plan: Callable  # (attention_mask [B, T] numpy, seed) -> packing.Layout, placed
    place_layout: Callable  # (host packing.Layout) -> placed
    score: Callable  # (params, ref_params, critic_params, batch, layout) -> Scored
    update: Callable  # (state, Scored, layout) -> (state, metrics)
    param_sharding: Any
    critic_sharding: Any
    state_sharding: Any
    batch_sharding: Any  # (array) -> its NamedSharding
    placement: Placement


def make_train_fns(config: models.ModelConfig, uc: UpdateConfig, actor_opt, critic_opt=None,
                   mesh: jax.sharding.Mesh | None = None, rules=DEFAULT_RULES) -> TrainFns:
    """Builds the jitted init / score / update functions and the packing planner.

    With a mesh, parameters are placed by their logical axes (`rules`), optimizer states like
    their parameters, [B, ...] batch arrays split along ("data", "fsdp") and packed
    micro-batches along their rows; the state is donated to `update`. Without a mesh
    everything lives on the default device.
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

    state_sharding = training.TrainState(
        step=replicated, params=param_sharding, opt_state=opt_sharding(actor_opt, param_sharding),
        critic_params=critic_sharding,
        critic_opt_state=opt_sharding(critic_opt, critic_sharding) if uc.uses_critic else None)

    @jax.jit
    def _init(params, critic_params):
        return training.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                   opt_state=actor_opt.init(params), critic_params=critic_params,
                                   critic_opt_state=None if critic_params is None
                                   else critic_opt.init(critic_params))

    def init_state(params, critic_params=None):
        # Built where the inputs are (this process's devices), then placed: on several
        # processes `put` assembles the global arrays from every process's identical copy.
        state = _init(params, critic_params)
        return placement.put(state, state_sharding)

    def place_layout(layout: packing.Layout) -> packing.Layout:
        """A host plan on the mesh: packed micro-batches split along their rows, so every
        device works on every micro-batch."""
        return placement.put(layout, placement.shardings(packing.LAYOUT_AXES, layout))

    def plan(attention_mask, seed: int = 0, **shared) -> packing.Layout:
        """The packing plan of a batch (every process passes the whole batch), placed."""
        return place_layout(packing.plan(np.asarray(attention_mask), seed=seed, **uc.packing_args,
                                         **shared))

    # The scored [B, T] arrays leave split along rows, as `update` takes them.
    options = training.compiler_options()
    score_jit = jax.jit(functools.partial(score_batch, config, uc),
                        out_shardings=placement.batch_sharding(2), compiler_options=options)
    update_jit = jax.jit(functools.partial(update, config, uc, actor_opt, critic_opt),
                         in_shardings=(state_sharding, placement.batch_sharding(2), None),
                         out_shardings=(state_sharding, replicated), donate_argnums=(0,),
                         compiler_options=options)

    return TrainFns(init_state, plan, place_layout, score_jit, update_jit, param_sharding,
                    critic_sharding, state_sharding, batch_spec, placement)
