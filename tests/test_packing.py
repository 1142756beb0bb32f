"""Packed updates: the plan covers every real token once, and scoring plus the update on packed
rows give the unpacked rows' numbers (to float tolerance)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.rl_toy import toy_batch, toy_config
from zerosearch_jax import models, packing, training
from zerosearch_jax.rl import train_step as ts

PROMPT = 6  # toy_batch's prompt length


def ragged_batch(config, params, seed=0):
    """The toy batch with rows of different lengths: prompts left-padded by 0-2 tokens (the
    same for a question's samples, as the rollout pads), responses cut after 2-6 tokens (right
    padding), the reward on each row's last token."""
    batch, _ = toy_batch(config, params, jax.random.key(seed))
    B, T = batch["tokens"].shape
    rng = np.random.default_rng(seed)
    mask = np.ones((B, T), bool)
    rewards = np.zeros((B, T), np.float32)
    left = rng.integers(0, 3, size=B)
    for b in range(B):
        mask[b, :left[batch["group"][b]]] = False
        end = T - rng.integers(0, 5)
        mask[b, end:] = False
        rewards[b, end - 1] = batch["rewards"][b, -1]
    batch["attention_mask"] = mask
    batch["positions"] = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    batch["loss_mask"] = batch["loss_mask"] * mask
    batch["logprobs"] = batch["logprobs"] * mask
    batch["rewards"] = rewards
    return batch


def test_plan_places_every_real_token_once():
    rng = np.random.default_rng(0)
    mask = np.zeros((12, 20), bool)
    for b in range(12):
        start = rng.integers(0, 8)
        mask[b, start:start + rng.integers(3, 12)] = True
    layout = packing.plan(mask, rows=2, row_length=24, num_minibatches=3, ppo_epochs=2, seed=1)
    seg = layout.score_segment
    assert seg.shape == (6, 2, 24)  # worst case: one episode a row
    flat = layout.score_index[seg > 0]
    assert sorted(flat.tolist()) == np.flatnonzero(mask.reshape(-1)).tolist()
    x = rng.normal(size=mask.shape).astype(np.float32)
    back = np.asarray(packing.unpack(packing.gather(jnp.asarray(x), layout.score_index, seg),
                                     layout))
    np.testing.assert_array_equal(back[mask], x[mask])
    assert int(layout.score_used) < 6  # several episodes share rows
    # Each epoch's mini-batches partition the episodes, 4 a mini-batch.
    for e in range(2):
        episodes = [set(np.unique(layout.update_segment[e, n])) - {0} for n in range(3)]
        assert all(len(s) == 4 for s in episodes)
        assert set().union(*episodes) == set(range(1, 13))
    # Packed or not, the same seed draws the same mini-batches.
    unpacked = packing.plan(mask, rows=2, row_length=0, num_minibatches=3, ppo_epochs=2, seed=1)
    for e in range(2):
        for n in range(3):
            assert (set(np.unique(unpacked.update_segment[e, n]))
                    == set(np.unique(layout.update_segment[e, n])))


def test_a_group_shares_its_prompt():
    """Four samples of one question: their prompt (all but its last token) is placed once per
    row, each episode keeps the rest; every real token is still read back from a slot holding
    its own token."""
    P, T = 5, 12
    tokens = np.tile(np.arange(T, dtype=np.int32), (4, 1)) + 10
    mask = np.zeros((4, T), bool)
    mask[:, 1:P] = True  # prompt of 4 real tokens, left-padded by one
    for b, n in enumerate((3, 7, 5, 2)):
        tokens[b, P:] += 100 * b  # different responses
        mask[b, P:P + n] = True
    group = np.zeros(4, np.int32)
    layout = packing.plan(mask, rows=1, row_length=32, tokens=tokens, group=group,
                          prompt_length=P)
    assert int(layout.score_used) == 1
    assert (layout.score_segment > 0).sum() == 3 + 4 * 1 + (3 + 7 + 5 + 2)
    seg, pre = layout.score_segment[0, 0], layout.score_prefix[0, 0]
    assert set(pre[(seg >= 1) & (seg <= 4)]) == {seg[0]}  # every episode sees the shared part
    x = tokens.astype(np.float32)
    packed = np.asarray(packing.gather(jnp.asarray(x), layout.score_index, layout.score_segment))
    back = np.asarray(packing.unpack(jnp.asarray(packed), layout))
    np.testing.assert_array_equal(back[mask], x[mask])


def test_a_groups_episodes_are_packed_together_when_that_saves_a_row():
    """Two groups of three (8 prompt columns, 7 shared): by decreasing length alone the
    episodes fill 4 rows of 48; a group's episodes placed in turn share its prompt and fill 3.
    Every real token is still placed once."""
    P, lengths = 8, (37, 37, 15, 13, 13, 31)
    group = np.repeat(np.arange(2, dtype=np.int32), 3)
    T = max(lengths)
    mask = np.arange(T)[None] < np.array(lengths)[:, None]
    tokens = np.tile(np.arange(T, dtype=np.int32), (6, 1)) + 100 * group[:, None]
    tokens[:, P:] += 1000 * np.arange(6, dtype=np.int32)[:, None]  # own responses
    layout = packing.plan(mask, rows=1, row_length=48, tokens=tokens, group=group,
                          prompt_length=P)
    assert int(layout.score_used) == 3
    x = tokens.astype(np.float32)
    packed = np.asarray(packing.gather(jnp.asarray(x), layout.score_index, layout.score_segment))
    np.testing.assert_array_equal(np.asarray(packing.unpack(jnp.asarray(packed), layout))[mask],
                                  x[mask])


def test_episode_longer_than_a_packed_row_is_refused():
    with pytest.raises(ValueError, match="pack_length"):
        packing.plan(np.ones((2, 30), bool), rows=1, row_length=16)


def test_segments_do_not_see_each_other():
    """A token's log-prob in a packed row equals its log-prob alone in its own row."""
    config = toy_config()
    params = models.init_params(config, 0)
    tokens = np.array([[1, 5, 7, 9, 2, 3], [1, 6, 6, 4, 0, 0]], np.int32)
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    alone, _ = training.policy_logprobs(config, params, tokens, mask, positions)
    packed_tokens = np.concatenate([tokens[0], tokens[1, :4]])[None]
    packed_pos = np.concatenate([positions[0], positions[1, :4]])[None]
    segment = np.array([[1] * 6 + [2] * 4], np.int32)
    packed, _ = training.policy_logprobs(config, params, packed_tokens, None, packed_pos,
                                         segment_ids=segment)
    packed = np.asarray(packed)[0]
    np.testing.assert_allclose(packed[:6], np.asarray(alone)[0], atol=1e-5)
    # Entry 0 of a segment is never read (a prompt token); the rest match.
    np.testing.assert_allclose(packed[7:10], np.asarray(alone)[1, 1:4], atol=1e-5)


def _scored_and_updated(batch, params, estimator, pack_length, micro, share=False):
    config = toy_config()
    uc = ts.UpdateConfig(advantage_estimator=estimator, micro_batch_size=micro,
                         num_minibatches=2, ppo_epochs=2, remat=False, pack_length=pack_length)
    opt = optax.sgd(0.5)  # linear in the gradient: summation order stays at float epsilon
    fns = ts.make_train_fns(config, uc, opt, optax.sgd(0.5) if uc.uses_critic else None)
    critic = ts.init_critic(config, params, jax.random.key(0)) if uc.uses_critic else None
    state = fns.init_state(jax.tree.map(jnp.copy, params), critic)
    shared = ({"tokens": batch["tokens"], "group": batch["group"], "prompt_length": PROMPT}
              if share else {})
    layout = fns.plan(batch["attention_mask"], seed=3, **shared)
    scored = fns.score(state.params, params, state.critic_params, batch, layout)
    scored = jax.device_get(scored)
    state, metrics = fns.update(state, scored, layout)
    return scored, state, metrics, packing.padding_fraction(jax.device_get(layout))


@pytest.mark.parametrize(("estimator", "share"), [("grpo", False), ("gae", False),
                                                  ("grpo", True), ("gae", True)])
def test_packed_update_equals_unpacked(estimator, share):
    """Several episodes a row (and with `share`, a group's prompt once for its episodes):
    the same scores, losses and updated parameters as one episode a row."""
    config = toy_config()
    params = models.init_params(config, 1)
    batch = ragged_batch(config, params)
    T = batch["tokens"].shape[1]
    s0, st0, m0, pad0 = _scored_and_updated(batch, params, estimator, 0, 4)
    s1, st1, m1, pad1 = _scored_and_updated(batch, params, estimator, 2 * T, 1, share)
    assert pad1 < pad0  # packing removed padding
    mask = batch["attention_mask"]
    loss = batch["loss_mask"] > 0
    for f in dataclasses.fields(ts.Scored):
        a, b = getattr(s0, f.name), getattr(s1, f.name)
        if a is None:
            assert b is None
            continue
        where = loss if f.name in ("ref_logprobs", "old_logprobs", "old_values") else mask
        np.testing.assert_allclose(np.asarray(a)[where], np.asarray(b)[where], atol=1e-5,
                                   err_msg=f.name)
    for k in m0:
        np.testing.assert_allclose(float(m0[k]), float(m1[k]), atol=1e-5, err_msg=k)
    moved = 0.0
    for a, b, p in zip(jax.tree.leaves(st0.params), jax.tree.leaves(st1.params),
                       jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
        moved = max(moved, float(jnp.abs(a - p).max()))
    assert moved > 1e-4  # the update did something
