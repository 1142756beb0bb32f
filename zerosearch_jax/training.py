"""The training kit shared by every tuning loop: the RL learner (`rl.train_step`), the
simulator's SFT and the policy's format warm-up (`simulator_sft.finetune`).

- `TrainState`: what an update changes (step, parameters, optimizer state; a critic's too).
- `make_optimizer` / `lr_schedule`: AdamW after global-norm clipping, linear warm-up counted
  in steps of `updates_per_step` optimizer updates, then constant (veRL's optimizer).
- `apply_if_finite`: one optimizer step, skipped (state kept) on a non-finite loss or gradient.
- `policy_logprobs`: log p(token t | tokens < t) and the entropy of that distribution from the
  model, through the LM-head kernel (`models.head_logprobs_entropy`) so no [B, T, V] logits are
  held; on padded rows (`attention_mask`) or packed rows (`segment_ids`, several sequences a
  row, `segment_attention_mask`). `hidden_states` and `shift_right` are its pieces.
- `masked_token_nll`: the next-token NLL over a loss mask as (sum, count), so a step split
  into micro-batches divides once by the total count; `accumulate`: the gradient summed over a
  step's micro-batches (the packed ones in use).
- `compiler_options`: how every training program (the RL learner's, the SFT step) is jitted:
  XLA:CPU at LLVM level 2 on a CPU, which runs the RL update faster; nothing elsewhere.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from zerosearch_jax import models

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    """Everything the update changes. critic_* are None without a critic."""

    step: Array
    params: Any
    opt_state: Any
    critic_params: Any = None
    critic_opt_state: Any = None


# ----------------------------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------------------------

# XLA:CPU compiles its fused loops through LLVM at `xla_backend_optimization_level` 3 by
# default. The training programs (packed forward and backward, AdamW) run faster at 2: the RL
# update phase on a real rollout's batch 180-182 -> 204-208 real tokens/s (level 1: 206-215),
# the same losses, side by side on a 2-core AMD EPYC (docs/benchmarks.md). The in-graph rollout
# runs slower at 2 (25.1 -> 30.6 s a rollout), so the samplers keep the default. Matmuls run
# in libraries (oneDNN, YNNPACK), which the level does not touch.
CPU_TRAINING_COMPILER_OPTIONS = {"xla_backend_optimization_level": 2}


def compiler_options() -> dict[str, Any] | None:
    """`jax.jit(..., compiler_options=...)` for a training program: the CPU options above on a
    CPU backend, unless XLA_FLAGS sets the level itself (the user's choice wins); None on an
    accelerator."""
    if jax.default_backend() != "cpu" or "xla_backend_optimization_level" in os.environ.get(
            "XLA_FLAGS", ""):
        return None
    return dict(CPU_TRAINING_COMPILER_OPTIONS)


# ----------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------


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


def apply_if_finite(optimizer, grads, params, opt_state, loss, grad_norm=None):
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


# ----------------------------------------------------------------------------------------------
# Token log-probs / entropy of the policy, and the masked next-token loss.
# ----------------------------------------------------------------------------------------------


def shift_right(x: Array) -> Array:
    """Entry t <- entry t-1 (entry 0 <- 0): quantities computed at the position that predicts
    token t are indexed by token t, like the rollout's log-probs and loss mask."""
    return jnp.pad(x[:, :-1], [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2))


def segment_attention_mask(segment: Array, prefix: Array | None = None) -> Array:
    """segment, prefix [B, L] int -> [B, L, L] bool: query t sees keys s <= t of its own
    segment (0 = padding, never seen) and every key of the shared prompt `prefix[t]` (placed
    before it in the row; 0: none)."""
    L = segment.shape[-1]
    causal = jnp.tril(jnp.ones((L, L), bool))
    keys = segment[:, None, :]
    mask = causal[None] & (segment[:, :, None] == keys) & (keys > 0)
    if prefix is not None:
        mask = mask | ((prefix[:, :, None] == keys) & (prefix[:, :, None] > 0))
    return mask


def hidden_states(config: models.ModelConfig, params, tokens, attention_mask, positions,
                  remat=False, dtype=None, segment_ids=None, prefix_ids=None):
    """The final-norm hidden states [B, T, E] of the decoder (policy or critic backbone):
    causal over attention_mask [B, T], or, with segment_ids, within each packed segment."""
    if segment_ids is not None:  # packed rows: causal within each episode (and its prompt)
        attn = segment_attention_mask(segment_ids, prefix_ids)
    else:
        attn = models.causal_attention_mask(attention_mask.astype(bool))
    out, _ = models.Transformer(config, remat=remat, dtype=dtype).apply(
        {"params": params}, tokens, positions, attn, return_hidden=True)
    return out


def policy_logprobs(config: models.ModelConfig, params, tokens: Array, attention_mask: Array,
                    positions: Array, temperature: float = 1.0, remat: bool = False,
                    dtype=None, segment_ids: Array | None = None,
                    prefix_ids: Array | None = None,
                    needed: Array | None = None) -> tuple[Array, Array]:
    """(log p(tokens[t] | tokens[<t]) [B, T], entropy of that distribution [B, T]), float32.

    Entry 0 of both is 0 (nothing predicts the first token). dtype: matmul input dtype.
    segment_ids [B, T] (packed rows, 0 = padding) replaces attention_mask: a token attends to
    its own episode only; an episode's first entry then holds a prediction from the episode
    before it, which no loss reads (it is a prompt token). prefix_ids [B, T]: the segment of a
    shared prompt each token also attends to (`packing.plan`), 0 for none.

    needed [B, T] (a loss mask: nonzero where the caller reads an entry): the LM head runs on
    those positions only (`models.compact_positions`) and every other entry is 0. A loss
    reads a fraction of a row (in an RL batch the policy's tokens, not the prompt or the
    inserted documents), and the head is ~a fifth of a small model's matmul work.
    """
    hidden = hidden_states(config, params, tokens, attention_mask, positions, remat, dtype,
                           segment_ids, prefix_ids)
    head = models.head_weight(config, params)
    # Position t predicts token t + 1; the last position predicts nothing (its target is a
    # dummy and its value is shifted out).
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    dtype = jnp.dtype(dtype or head.dtype)
    if needed is None:
        logp, entropy = models.head_logprobs_entropy(hidden, head, targets, dtype,
                                                     float(temperature))
        return shift_right(logp), shift_right(entropy)
    # Entry t of the output is position t - 1's prediction.
    wanted = jnp.pad(needed[:, 1:] != 0, ((0, 0), (0, 1)))
    order, inverse, n_valid = models.compact_positions(wanted)
    logp, entropy = models.head_logprobs_entropy(
        models.permute(hidden, order, inverse), head, jnp.take_along_axis(targets, order, 1),
        dtype, float(temperature), n_valid=n_valid)
    logp, entropy = (jnp.where(wanted, models.permute(x, inverse, order), 0.0)
                     for x in (logp, entropy))
    return shift_right(logp), shift_right(entropy)


def masked_token_nll(config: models.ModelConfig, params, batch: dict, *, remat: bool = False,
                     dtype=None) -> tuple[Array, Array]:
    """(NLL sum, token count) of the next-token loss over `loss_mask`.

    batch: tokens, positions, loss_mask and either attention_mask (padded rows) or segment
    (packed rows: several sequences a row, `packing.plan`'s segment ids) [B, T]; loss_mask is
    indexed by the token's own position (1 on the tokens to learn), like `policy_logprobs`'
    output, so a packed sequence's first token (predicted across the boundary) is never in it.
    """
    logp, _ = policy_logprobs(config, params, batch["tokens"], batch.get("attention_mask"),
                              batch["positions"], remat=remat, dtype=dtype,
                              segment_ids=batch.get("segment"), needed=batch["loss_mask"])
    nll = -(logp * batch["loss_mask"]).sum()
    count = batch["loss_mask"].sum()
    return nll, count


def accumulate(loss_fn: Callable, params, micro_batch: Callable, n_micro: Array):
    """Sum of grads (float32) and metric sums of loss_fn(params, batch) -> (loss, metrics) over
    micro-batches 0..n_micro-1 (micro_batch(i) builds one; a loop whose length is data, so a
    step that fills fewer packed micro-batches runs fewer and no shape depends on it)."""
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    metric_zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        lambda: loss_fn(params, micro_batch(0))[1]))

    def body(i, carry):
        grads, metrics = carry
        (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(params, micro_batch(i))
        grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
        return grads, jax.tree.map(jnp.add, metrics, m)

    return jax.lax.fori_loop(0, n_micro, body, (zeros, metric_zeros))


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW for the actor and the critic (the config's `optim` section; veRL's defaults)."""

    lr: float = 1e-6
    critic_lr: float = 1e-5
    warmup_ratio: float = 0.0  # of the run's optimizer updates, linear from 0.
    critic_warmup_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.01
    grad_clip: float = 1.0

    def __post_init__(self):
        for name in ("lr", "critic_lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} = {getattr(self, name)!r}: expected > 0")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)!r}: expected in [0, 1)")
        for name in ("warmup_ratio", "critic_warmup_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} = {getattr(self, name)!r}: expected in [0, 1]")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay = {self.weight_decay!r}: expected >= 0")

    def make(self, total_steps: int, updates_per_step: int = 1,
             critic: bool = False) -> optax.GradientTransformation:
        """The actor's (or, with `critic`, the critic's) optimizer for a run of `total_steps`
        RL steps of `updates_per_step` updates each."""
        lr, warmup = ((self.critic_lr, self.critic_warmup_ratio) if critic else
                      (self.lr, self.warmup_ratio))
        return make_optimizer(lr, total_steps, warmup, (self.b1, self.b2), self.weight_decay,
                              self.grad_clip, updates_per_step)
