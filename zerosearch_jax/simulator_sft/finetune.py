"""Supervised fine-tuning of the simulator: next-token loss on the target documents only.

Each example is the docs/method.md §3 prompt (question, gold answer, query, useful / noisy) followed
by its `Doc i:` target and the end-of-turn token; the loss mask covers the target and that token,
so the model learns to write documents, not to reproduce prompts. The step is one pure function
(AdamW through `training.make_optimizer`, float32 master weights, `compute_dtype` matmuls,
a non-finite step skipped), jitted once with the state donated. With `pack_length` a step's
examples are packed several to a row (`packing.plan`, as the RL update's episodes; attention
within each example), so the step runs on real tokens, not padding, in fixed shapes.
Checkpoints (orbax) hold the state and the data position, so an interrupted tuning resumes
where it stopped; the result is exported as a Hugging Face directory that
`models.load_pretrained` (and vLLM / SGLang) read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zerosearch_jax import checkpoints, models, packing, training
from zerosearch_jax.data.iterator import DataIterator
from zerosearch_jax.search.base import QueryContext
from zerosearch_jax.search.simulator import SimulatorPrompt

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Upstream tuned with lr 1e-6, batch 2, 1000 steps (docs/method.md §8)."""

    steps: int = 1000
    batch_size: int = 2
    max_length: int = 1024  # prompt + target tokens; longer targets are cut (counted, logged).
    lr: float = 1e-6
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    compute_dtype: str = "bfloat16"
    remat: bool = True
    # Tokens per packed row (a step's examples several to a row; packing.plan): the step runs
    # only the rows they fill, micro_batch_size rows per forward/backward. 0: one example per
    # row of max_length tokens, micro_batch_size rows a micro-batch.
    pack_length: int = 0
    micro_batch_size: int = 0  # 0: batch_size (unpacked) or 1 (packed).
    # The loss weight of the gold answer's tokens in a useful target (1: the plain mean NLL).
    # The loss is a weighted mean, so a weight w makes each answer token count as w target
    # tokens: the one fact a useful page must carry is learnt first (docs/simulator_sft.md).
    answer_weight: float = 1.0
    # The loss weight of the tokens that end a document (the newline before `Doc k+1:`) and
    # the page (the end-of-turn token), in every target: where the model decides that a
    # document is as long as the engine's (its cut passages) and that the page has `topk`.
    boundary_weight: float = 1.0
    checkpoint_every: int = 100
    keep: int = 2
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_length", "checkpoint_every", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("answer_weight", "boundary_weight"):
            if not getattr(self, name) >= 1.0:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pack_length < 0 or self.micro_batch_size < 0:
            raise ValueError(f"pack_length and micro_batch_size must be >= 0, got "
                             f"{self.pack_length} and {self.micro_batch_size}")

    @property
    def rows(self) -> int:
        """Rows per forward/backward."""
        return self.micro_batch_size or (1 if self.pack_length else self.batch_size)

    def plan(self, attention_mask: np.ndarray) -> packing.Layout:
        """The packing of one step's examples (attention_mask [batch_size, max_length])."""
        return packing.plan(attention_mask, self.rows, self.pack_length)


def answer_spans(target: Sequence[int], answers: Sequence[Sequence[int]]) -> np.ndarray:
    """[len(target)] bool: the tokens of every occurrence of one of the `answers` token
    sequences in `target`."""
    target = list(target)
    out = np.zeros(len(target), bool)
    for seq in answers:
        L = len(seq)
        for i in range(len(target) - L + 1):
            if target[i:i + L] == list(seq):
                out[i:i + L] = True
    return out


def encode(tokenizer, examples: Sequence[dict], max_length: int,
           answer_weight: float = 1.0, boundary_weight: float = 1.0) -> tuple[dict, int]:
    """Right-padded training arrays and the number of examples whose target was cut.

    Returns {tokens, attention_mask, positions, loss_mask}: [N, max_length] arrays; loss_mask
    is 1 on target tokens (and the closing end-of-turn token), `answer_weight` on the tokens
    of a useful target's gold answer (the one its prompt names, spelled as
    `SimulatorPrompt.answer_bans` spells it), `boundary_weight` on the tokens that end a
    document or the page (a token holding a newline, the end-of-turn token).
    """
    newline = [i for i, s in enumerate(tokenizer.token_strings) if "\n" in s] \
        if boundary_weight != 1.0 else []
    N, T = len(examples), max_length
    tokens = np.full((N, T), tokenizer.pad_id, np.int32)
    loss_mask = np.zeros((N, T), np.float32)
    attention = np.zeros((N, T), bool)
    cut = 0
    assembly = SimulatorPrompt.make(tokenizer, "finetuned")
    for i, e in enumerate(examples):
        if {"query", "question", "golden_answers", "label"} <= e.keys():
            # The token assembly the simulator is prompted with at RL time.
            context = QueryContext(e["question"], tuple(e["golden_answers"]))
            prompt = assembly.ids(tokenizer, e["query"], context, e["label"] == "useful")
        else:  # a record with only its prompt text
            prompt = tokenizer.encode(tokenizer.chat_prompt(e["prompt"], system=""))
        target = tokenizer.encode(e["target"]) + [tokenizer.eos_ids[0]]
        full = len(target)
        if len(prompt) >= T:
            raise ValueError(f"example {e.get('id')!r}: its prompt alone has {len(prompt)} "
                             f"tokens, more than finetune.max_length={T}")
        if len(prompt) + len(target) > T:
            cut += 1
            target = target[:T - len(prompt)]
        ids = prompt + target
        tokens[i, :len(ids)] = ids
        attention[i, :len(ids)] = True
        loss_mask[i, len(prompt):len(ids)] = 1.0
        if boundary_weight != 1.0:
            ends = np.isin(target, newline)
            ends[-1] |= len(target) == full  # the end-of-turn token, unless cut off
            loss_mask[i, len(prompt):len(ids)][ends] = boundary_weight
        if answer_weight != 1.0 and e.get("label") == "useful" and e.get("golden_answers"):
            spans = answer_spans(target, SimulatorPrompt.answer_bans(tokenizer,
                                                                     e["golden_answers"]))
            loss_mask[i, len(prompt):len(ids)][spans] = answer_weight
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (N, T)).copy()
    return {"tokens": tokens, "attention_mask": attention, "positions": positions,
            "loss_mask": loss_mask}, cut


def sft_loss(config: models.ModelConfig, params, batch: dict, *, remat: bool = True,
             dtype=None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(mean NLL over target tokens, (NLL sum, target token count)). batch arrays: [B, T]."""
    nll, count = training.masked_token_nll(config, params, batch, remat=remat, dtype=dtype)
    return nll / jnp.maximum(count, 1.0), (nll, count)


def sft_step(config: models.ModelConfig, sc: SFTConfig, optimizer, state: training.TrainState,
             batch: dict, layout: packing.Layout) -> tuple[training.TrainState, dict]:
    """One AdamW step on a batch of examples. Pure; jit it with the state donated.

    batch: tokens, attention_mask, positions, loss_mask [B, T]; layout: `sc.plan` of its
    attention mask. The gradient is summed over the layout's micro-batches in use (packed or one
    example a row) and divided once by the step's target-token count (loss_mask's sum: answer
    tokens count `answer_weight` times, document ends `boundary_weight`), so it does not
    depend on the packing.
    """
    dtype = jnp.dtype(sc.compute_dtype)
    layout = jax.tree.map(jnp.asarray, layout)  # a host plan works too, outside jit
    count = jnp.maximum(batch["loss_mask"].sum(), 1.0)
    fields = {k: batch[k] for k in ("tokens", "positions", "loss_mask")}

    def micro_batch(i):
        index, segment = layout.score_index[i], layout.score_segment[i]
        mb = {k: packing.gather(v, index, segment) for k, v in fields.items()}
        mb["segment"] = segment
        return mb

    def loss_fn(params, mb):
        nll, _ = training.masked_token_nll(config, params, mb, remat=sc.remat, dtype=dtype)
        return nll / count, {"nll": nll}

    grads, sums = training.accumulate(loss_fn, state.params, micro_batch, layout.score_used)
    loss = sums["nll"] / count
    grad_norm = optax.global_norm(grads)
    params, opt_state, finite = training.apply_if_finite(optimizer, grads, state.params,
                                                          state.opt_state, loss, grad_norm)
    metrics = {"loss": loss, "target_tokens": count, "grad_norm": grad_norm,
               "nonfinite": 1.0 - finite.astype(jnp.float32),
               "real_tokens": batch["attention_mask"].sum(dtype=jnp.float32),
               "token_slots": (layout.score_used * layout.score_index[0].size).astype(
                   jnp.float32)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def run_finetune(config: models.ModelConfig, params, tokenizer, examples: Sequence[dict],
             workdir: str, sc: SFTConfig, *, progress: bool = True):
    """Tunes `params` (donated: `tune_on_arrays`) on the examples; checkpoints in
    `<workdir>/checkpoints` (resumed when present), the loss curve in
    `<workdir>/metrics.jsonl`. Returns the tuned parameters."""
    if not examples:
        raise ValueError("no SFT examples to tune on")
    data, cut = encode(tokenizer, examples, sc.max_length, sc.answer_weight, sc.boundary_weight)
    if cut:
        logger.warning("%d of %d targets were cut to fit finetune.max_length=%d", cut,
                       len(examples), sc.max_length)
    return tune_on_arrays(config, params, data, workdir, sc, progress=progress,
                          desc="simulator sft")


def tune_on_arrays(config: models.ModelConfig, params, data: dict[str, np.ndarray],
                   workdir: str, sc: SFTConfig, *, progress: bool = True,
                   desc: str = "sft"):
    """The masked next-token tuning loop on encoded rows (the simulator's SFT, the policy's
    format warm-up): `data` holds tokens, attention_mask, positions, loss_mask [N, T]; each
    step draws `sc.batch_size` rows (shuffled per epoch from `sc.seed`). Checkpoints (state
    and data position) in `<workdir>/checkpoints`, resumed when present; the loss curve in
    `<workdir>/metrics.jsonl`. Returns the tuned parameters. `params` are donated to the
    first step (their buffers are reused, not copied): pass a copy to keep them."""
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from zerosearch_jax.metrics import MetricsWriter

    n = len(data["tokens"])
    if n == 0:
        raise ValueError("no rows to tune on")
    longest = int(data["attention_mask"].sum(axis=1).max())
    if sc.pack_length and longest > sc.pack_length:
        raise ValueError(f"an example has {longest} tokens, more than pack_length="
                         f"{sc.pack_length}: raise it to at least the longest example")
    optimizer = training.make_optimizer(sc.lr, sc.steps, sc.warmup_ratio,
                                        weight_decay=sc.weight_decay, grad_clip=sc.grad_clip)
    state = training.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=optimizer.init(params))
    step_fn = jax.jit(lambda s, b, lay: sft_step(config, sc, optimizer, s, b, lay),
                      donate_argnums=(0,), compiler_options=training.compiler_options())
    order = DataIterator(list(range(n)), seed=sc.seed)

    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=sc.keep, create=True))
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    start = 0
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored = checkpoints.restore_latest_intact(manager, abstract)
    if restored is not None:
        _, state, meta = restored
        start = int(meta["step"])
        order.restore(meta["data"])
        writer.truncate_after(start)
        logger.info("%s resumed at step %d", desc, start)

    bar = tqdm(range(start, sc.steps), initial=start, total=sc.steps, desc=desc,
               disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx = np.asarray(order.next_batch(sc.batch_size))
        batch = {k: v[idx] for k, v in data.items()}
        state, metrics = step_fn(state, batch, sc.plan(batch["attention_mask"]))
        metrics = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
        writer.write(step + 1, metrics)
        bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")
        done = step + 1
        if done % sc.checkpoint_every == 0 or done == sc.steps:
            checkpoints.save(manager, done, state, {"step": done, "data": order.state()})
    writer.close()
    return state.params
