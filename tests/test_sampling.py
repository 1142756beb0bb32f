"""The sampler: HF greedy parity, stop conditions, and the sampling distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from zerosearch_jax import models, sampling
from zerosearch_jax.sampling import StopConditions
from zerosearch_jax.tokenizer import StopPattern

# -- a toy model whose greedy continuation is known: token t is always followed by succ[t] -----


def chain_model(successor: np.ndarray, scale: float = 50.0):
    """One-hot embeddings, zeroed blocks (the residual passes through), and an LM head that
    maps token t to successor[t] with margin `scale`."""
    V = len(successor)
    config = models.tiny_config("llama", vocab_size=V, hidden_size=V, intermediate_size=8,
                                num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4)
    params = jax.tree.map(jnp.zeros_like, models.init_params(config))
    eye = np.eye(V, dtype=np.float32)
    params["embedder"]["embedding"] = jnp.asarray(eye)
    params["final_norm"]["scale"] = jnp.ones(V) / np.sqrt(V)  # RMSNorm(one-hot) = sqrt(V)
    params["lm_head"]["weight"] = _head(successor, scale)
    return config, params


def _head(successor, scale):
    V = len(successor)
    w = np.zeros((V, V), np.float32)  # [V_out, E]; logit[o] = w[o] . onehot(t) = w[o, t]
    w[successor, np.arange(V)] = scale
    return jnp.asarray(w)


V = 32
SUCC = (np.arange(V) + 1) % V  # 0 -> 1 -> 2 -> ... -> 31 -> 0


def test_chain_model_follows_its_chain():
    config, params = chain_model(SUCC)
    out = sampling.generate(config, params, [[5], [20, 7]], max_new_tokens=6)
    np.testing.assert_array_equal(out["tokens"], [[6, 7, 8, 9, 10, 11], [8, 9, 10, 11, 12, 13]])
    np.testing.assert_array_equal(out["lengths"], [6, 6])
    assert not out["stopped"].any()


def test_stop_pattern_ends_each_row_right_after_the_tag():
    config, params = chain_model(SUCC)
    tag = StopPattern("</search>", (frozenset({10, 25}), frozenset({11}), frozenset({12})))
    stop = StopConditions(eos_ids=(30,), patterns=(tag,), pad_id=0)
    out = sampling.generate(config, params, [[7], [3, 3, 3], [13], [27]], max_new_tokens=12,
                            stop=stop)
    # row 0: 8 9 10 11 12 | stop after the tag; row 1: 4 .. 12; row 2 runs to the limit;
    # row 3: 28 29 30 = EOS.
    np.testing.assert_array_equal(out["lengths"], [5, 9, 12, 3])
    np.testing.assert_array_equal(out["stopped"], [True, True, False, True])
    np.testing.assert_array_equal(out["tokens"][0], [8, 9, 10, 11, 12] + [0] * 7)
    np.testing.assert_array_equal(out["tokens"][1, :9], np.arange(4, 13))
    assert (out["tokens"][1, 9:] == 0).all() and (out["logprobs"][0, 5:] == 0).all()
    np.testing.assert_array_equal(out["tokens"][3, :3], [28, 29, 30])


def test_partial_tag_does_not_stop():
    succ = SUCC.copy()
    succ[11] = 20  # 10 11 then 20: the tag is never completed
    config, params = chain_model(succ)
    tag = StopPattern("t", (frozenset({10}), frozenset({11}), frozenset({12})))
    out = sampling.generate(config, params, [[8]], max_new_tokens=6,
                            stop=StopConditions(patterns=(tag,)))
    assert out["lengths"][0] == 6 and not out["stopped"][0]


def test_banned_sequences_are_never_completed():
    config, params = chain_model(SUCC)
    # Greedy from 7 runs 8 9 10 11 ...; banning (9, 10) masks 10 after 9, so the row takes the
    # next best token (every other logit ties at 0: token 0) and follows the chain from there.
    # A one-token sequence is masked everywhere; a row without sequences is unchanged.
    out = sampling.generate(config, params, [[7], [7], [7]], max_new_tokens=6,
                            banned=[[[9, 10]], [[8]], []])
    np.testing.assert_array_equal(out["tokens"], [[8, 9, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5],
                                                  [8, 9, 10, 11, 12, 13]])
    # The prefix alone is allowed, and a sequence whose prefix never occurs bans nothing.
    out = sampling.generate(config, params, [[7]], max_new_tokens=4, banned=[[[9, 11], [3, 4, 9]]])
    np.testing.assert_array_equal(out["tokens"], [[8, 9, 10, 11]])


def test_banned_sequences_under_sampling():
    # A uniform model (every logit 0): over many draws the bigram (3, 4) never appears while
    # 3 and 4 themselves do, and the unbanned row shows the bigram.
    config, params = chain_model(SUCC, scale=0.0)
    prompts = [[1]] * 8
    out = sampling.generate(config, params, prompts, sampling.Temperature(1.0),
                            max_new_tokens=400, rng=3, banned=[[[3, 4]]] * 4 + [[]] * 4)
    toks = out["tokens"]

    def bigrams(rows):
        return sum(int(np.sum((r[:-1] == 3) & (r[1:] == 4))) for r in rows)

    assert bigrams(toks[:4]) == 0 and bigrams(toks[4:]) > 0
    assert (toks[:4] == 3).sum() > 0 and (toks[:4] == 4).sum() > 0


def test_pad_banned_buckets_its_shape():
    a = sampling.pad_banned([[[5, 6, 7]], []], 4)
    assert a.shape == (4, 4, 8) and a[0, 0, :4].tolist() == [5, 6, 7, -1] and (a[1:] == -1).all()
    assert sampling.pad_banned([[list(range(9))] * 5], 1).shape == (1, 8, 16)


def test_decode_leaves_generation_in_the_cache():
    """After decode the cache holds prompt + every generated token (stop tag included)."""
    config, params = chain_model(SUCC)
    cache = models.init_cache(config, 2, 16, dtype=jnp.float32)
    prompt = np.array([[0, 5], [3, 4]])
    mask = np.array([[False, True], [True, True]])
    logits, cache = models.extend(config, params, prompt, mask, cache, last_only=True)
    stop = StopConditions(eos_ids=(8,))
    out, cache = sampling.decode(config, params, cache, logits, jax.random.key(0),
                                 sampler=sampling.Greedy(), max_new_tokens=6, stop=stop)
    np.testing.assert_array_equal(np.asarray(out.lengths), [3, 4])  # 6 7 8 | 5 6 7 8
    assert int(cache.index) == 2 + 4  # the loop ran until the last row stopped
    np.testing.assert_array_equal(np.asarray(cache.key_mask[:, :6]),
                                  [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(cache.next_position), [4, 6])


def test_prompt_buckets_share_one_program():
    config, params = chain_model(SUCC)
    before = sampling.prefill_and_decode._cache_size()
    for prompt in ([1], [1, 2, 3], [4] * 20, [5] * 31):
        sampling.generate(config, params, [prompt, [2]], max_new_tokens=4)
    assert sampling.prefill_and_decode._cache_size() - before <= 1
    assert sampling.bucket_length(33) == 64 and sampling.bucket_length(5000) == 8192
    assert [sampling.bucket_batch(n) for n in (1, 2, 3, 5, 9, 17)] == [2, 2, 4, 8, 16, 24]


# -- sampling methods on toy logits ------------------------------------------------------------

LOGITS = jnp.array([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0], [0.0, 0.0, 0.0, 3.0, 1.0, -2.0]])


def _empirical(sampler, n=40_000, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    toks, logps = jax.vmap(lambda k: sampler(LOGITS, k))(keys)  # [n, B]
    freqs = np.stack([np.bincount(np.asarray(toks[:, b]), minlength=LOGITS.shape[1]) / n
                      for b in range(LOGITS.shape[0])])
    return freqs, np.asarray(toks), np.asarray(logps)


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_matches_its_definition(temperature):
    s = sampling.Temperature(temperature)
    expected = _np_softmax(np.asarray(LOGITS) / temperature)
    np.testing.assert_allclose(np.exp(np.asarray(s.log_probs(LOGITS))), expected, rtol=1e-5)
    freqs, toks, logps = _empirical(s)
    assert np.abs(freqs - expected).max() < 0.01
    np.testing.assert_allclose(logps, np.log(expected)[np.arange(2), toks], rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_matches_its_definition(k):
    s = sampling.TopK(k, temperature=0.7)
    scaled = np.asarray(LOGITS) / 0.7
    expected = np.zeros_like(scaled)
    for b in range(2):
        kth = np.sort(scaled[b])[::-1][k - 1]
        top = scaled[b] >= kth  # ties with the k-th value are kept (row 1 has three zeros)
        expected[b, top] = _np_softmax(scaled[b, top])
    np.testing.assert_allclose(np.exp(np.asarray(s.log_probs(LOGITS))), expected, atol=1e-6)
    freqs, _, _ = _empirical(s)
    assert np.abs(freqs - expected).max() < 0.01


@pytest.mark.parametrize("p", [0.3, 0.8, 0.95, 1.0])
def test_top_p_matches_its_definition(p):
    s = sampling.TopP(p)
    probs = _np_softmax(np.asarray(LOGITS))
    expected = np.zeros_like(probs)
    for b in range(2):
        order = np.argsort(-probs[b])
        cum = np.cumsum(probs[b, order])
        n = int(np.searchsorted(cum, p - 1e-9) + 1)  # smallest prefix with mass >= p
        keep = probs[b] >= probs[b, order[n - 1]]  # ties with the last kept token are kept
        expected[b, keep] = probs[b, keep] / probs[b, keep].sum()
    np.testing.assert_allclose(np.exp(np.asarray(s.log_probs(LOGITS))), expected, atol=1e-6)
    freqs, _, _ = _empirical(s)
    assert np.abs(freqs - expected).max() < 0.01


def _vocab_logits(seed, peaked_rows, flat_rows, vocab=49152):
    """Rows shaped like a trained LM's next-token logits (a few tokens far above the rest,
    the nucleus inside the top 64) and flat rows (a nucleus of thousands of tokens)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(peaked_rows + flat_rows, vocab)).astype(np.float32)
    for b in range(peaked_rows):
        z[b, rng.integers(0, vocab, 5)] += rng.uniform(15.0, 20.0, 5)
    return jnp.asarray(z)


def test_top_p_candidates_give_the_exact_search_tokens_row_by_row():
    """The top-64 path gives the exact search's tokens and log-probs, and a row's draw is the
    same whether its batch runs the exact search (a flat row present) or not."""
    fast, exact = sampling.TopP(0.95), sampling.TopP(0.95, candidates=0)
    logits = _vocab_logits(0, peaked_rows=6, flat_rows=2)
    keys = jax.random.split(jax.random.key(3), 8)
    for step in range(4):
        k = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        got, want = jax.jit(fast)(logits, k), jax.jit(exact)(logits, k)
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-6)
        alone = jax.jit(fast)(logits[:6], k[:6])  # every row covered: no exact search
        np.testing.assert_array_equal(np.asarray(alone[0]), np.asarray(got[0][:6]))
    # The candidates hold the nucleus of the peaked rows only.
    nucleus = (np.exp(np.asarray(exact.log_probs(logits))) > 0).sum(-1)
    assert (nucleus[:6] <= 64).all() and (nucleus[6:] > 64).all(), nucleus


def test_sampling_inverts_the_cdf_with_each_rows_own_uniform():
    """With [B] keys, row b's token is where the vocabulary's CDF crosses 1 - uniform(key_b)
    (the two-level inversion picks what one cumulative sum picks), never a zero-probability
    token (rows with most of the vocabulary masked)."""
    rng = np.random.default_rng(1)
    sampler = jax.jit(sampling.Temperature(1.0))
    for trial in range(12):
        logits = jnp.asarray(rng.normal(size=(8, 5000)) * (0.5 + trial % 4), jnp.float32)
        if trial % 2:
            logits = jnp.where(jnp.asarray(rng.random((8, 5000)) < 0.95), -jnp.inf, logits)
        keys = jax.random.split(jax.random.key(trial), 8)
        u = 1.0 - np.asarray(jax.vmap(lambda k: jax.random.uniform(k, (1,)))(keys))
        probs = np.exp(np.asarray(jax.nn.log_softmax(logits), np.float64))
        cdf = np.cumsum(probs, -1)
        want = (cdf < u * cdf[:, -1:]).sum(-1)
        got, got_lp = sampler(logits, keys)
        np.testing.assert_array_equal(np.asarray(got), want)
        assert np.isfinite(np.asarray(got_lp)).all()


def test_greedy_and_reproducibility():
    toks, logps = sampling.Greedy()(LOGITS, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(toks), [0, 3])
    assert (np.asarray(logps) == 0).all()
    s = sampling.TopP(0.9)
    a = s(LOGITS, jax.random.key(7))[0]
    b = s(LOGITS, jax.random.key(7))[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    many = [tuple(np.asarray(s(LOGITS, jax.random.key(i))[0])) for i in range(20)]
    assert len(set(many)) > 1


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sampling.Temperature(0.0)
    with pytest.raises(ValueError, match="top-p needs 0 < p <= 1, got 1.5"):
        sampling.TopP(1.5)
    with pytest.raises(ValueError, match="top-p candidates must be >= 0, got -1"):
        sampling.TopP(0.9, candidates=-1)
    with pytest.raises(ValueError, match="unknown sampler 'beam'"):
        sampling.make_sampler("beam")


def test_generate_is_reproducible_with_a_key():
    config = models.tiny_config("qwen2")
    params = models.init_params(config, 0)
    kw = dict(max_new_tokens=10, rng=3)
    a = sampling.generate(config, params, [[5, 6], [7]], sampling.Temperature(1.0), **kw)
    b = sampling.generate(config, params, [[5, 6], [7]], sampling.Temperature(1.0), **kw)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    c = sampling.generate(config, params, [[5, 6], [7]], sampling.Temperature(1.0),
                          max_new_tokens=10, rng=4)
    assert (a["tokens"] != c["tokens"]).any()


# -- the real model against transformers.generate ------------------------------------------------


def test_greedy_matches_transformers_generate(smollm2, smollm2_torch, smollm2_tokenizer):
    """64 greedy tokens, token for token, on a batch of different-length prompts (float32)."""
    config, params = smollm2
    tok = smollm2_tokenizer
    questions = ["Tell me a short story about a cat.",
                 "Explain photosynthesis in detail for a child who is ten years old.",
                 "Describe the water cycle step by step.", "Hi"]
    prompts = [tok.encode(tok.chat_prompt(q)) for q in questions]
    assert len({len(p) for p in prompts}) == len(prompts)
    n = 64
    ours = sampling.generate(config, params, prompts, max_new_tokens=n,
                             stop=StopConditions.for_tokenizer(tok))
    ids, mask = tok.pad_batch(prompts)
    with torch.no_grad():
        ref = smollm2_torch.generate(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=n,
            do_sample=False, pad_token_id=tok.pad_id, eos_token_id=list(tok.eos_ids))
    ref = ref[:, ids.shape[1]:].numpy()
    assert (ours["lengths"] == n).sum() >= 3  # most rows really produce all 64 tokens
    np.testing.assert_array_equal(ours["tokens"][:, :ref.shape[1]], ref)
    assert (ours["tokens"][:, ref.shape[1]:] == tok.pad_id).all()
