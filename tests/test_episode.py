"""The in-graph rollout (agent/episode.py): one program per rollout against the in-process
simulator, checked against the same pieces stepped from the host, the text-level host loop,
and the episode semantics of a scripted policy (tests/scripted_policy.py)."""

import dataclasses

import jax
import numpy as np
import pytest

from tests.scripted_policy import scripted_policy, tiny_config
from zerosearch_jax import agent, models, sampling, search
from zerosearch_jax.agent import episode
from zerosearch_jax.data.qa import QAExample
from zerosearch_jax.simulator_sft import finetune

RC = agent.RolloutConfig(samples_per_prompt=2, max_turns=2, max_new_tokens=12, max_obs_tokens=40)


def _examples():
    return [QAExample(id=f"q{i}", question=q, golden_answers=("Paris",), data_source="test")
            for i, q in enumerate(["What is the capital of France", "Where is the Louvre?"])]


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def simulator(tok):
    config = tiny_config(tok.vocab_size)
    return search.LLMSimulator(config, models.init_params(config, 1), tok, max_new_tokens=16,
                               noise_probability=0.5)


def _both(tok, policy, simulator, sampler, rng=0, rc=RC):
    config, params = policy
    kw = dict(rollout_config=rc, sampler=sampler, rng=rng)
    one = episode.rollout(config, params, tok, _examples(), simulator, **kw)
    stepped = episode.rollout(config, params, tok, _examples(), simulator, stepped=True, **kw)
    return one, stepped


def _assert_same(a, b):
    (ba, sa), (bb, sb) = a, b
    for name in ("tokens", "attention_mask", "positions", "loss_mask", "rewards", "group"):
        np.testing.assert_array_equal(getattr(ba, name), getattr(bb, name), err_msg=name)
    np.testing.assert_allclose(ba.logprobs, bb.logprobs, atol=1e-5)
    assert sa.turns == sb.turns and sa.calls == sb.calls
    np.testing.assert_array_equal(sa.f1, sb.f1)


def test_scripted_episode_searches_reads_and_answers(tok, simulator):
    """Greedy: one program == the stepped pieces, and the episode is what the script says."""
    one, stepped = _both(tok, scripted_policy(tok), simulator, sampling.Greedy())
    _assert_same(one, stepped)
    batch, stats = one
    B = 4
    assert [t for t in stats.turns] == [["<search> capital </search>",
                                         stats.turns[0][1]]] * B
    assert stats.answers == [", Paris"] * B  # the script writes ">," then " Paris"
    np.testing.assert_array_equal(stats.f1, 1.0)
    np.testing.assert_array_equal(stats.searches, 1)
    np.testing.assert_array_equal(stats.engine_calls, 1)
    np.testing.assert_array_equal(stats.invalid_actions, 0)
    assert all(c[0].query == "capital" and c[0].turn == 0 for c in stats.calls)
    np.testing.assert_array_equal(stats.useful_calls + stats.noisy_calls, 1)
    P = batch.prompt_length
    for b in range(B):
        # Loss exactly on the policy's turns; the observation sits between them, masked.
        policy = batch.tokens[b][batch.loss_mask[b] > 0]
        assert tok.decode(policy) == "".join(stats.turns[b])
        response = batch.tokens[b, P:][batch.attention_mask[b, P:]]
        text = tok.decode(response)
        assert text.startswith("<search> capital </search>\n\n<information>")
        assert "</information>\n\n" in text and text.endswith(stats.turns[b][1])
        last = np.flatnonzero(batch.loss_mask[b])[-1]
        assert batch.rewards[b, last] == 1.0 and np.count_nonzero(batch.rewards[b]) == 1
        assert (batch.loss_mask[b, :P] == 0).all()
    # Positions count real tokens only.
    np.testing.assert_array_equal(
        batch.positions[batch.attention_mask],
        np.concatenate([np.arange(n) for n in batch.attention_mask.sum(1)]))
    assert stats.generated_tokens == int(batch.loss_mask.sum())


def test_sampled_rows_wander_and_both_forms_agree(tok, simulator):
    """Sampled, with an unsure script: rows take different paths (invalid actions, searches,
    answers at different turns), and one program still equals the stepped pieces."""
    policy = scripted_policy(tok, margin=4.0)
    one, stepped = _both(tok, policy, simulator, sampling.TopP(0.95), rng=3)
    _assert_same(one, stepped)
    batch, stats = one
    assert len({tuple(t) for t in stats.turns}) > 1  # not every row did the same
    assert (batch.loss_mask <= batch.attention_mask).all()
    assert stats.generated_tokens == int(batch.loss_mask.sum())
    assert (stats.engine_calls <= stats.searches).all()
    # Log-probs sit exactly on the sampled tokens.
    assert ((batch.logprobs != 0) <= (batch.loss_mask > 0)).all()


def test_rows_that_left_the_episode_do_not_run(tok, simulator, monkeypatch):
    """A policy turn and an observation insert run on the rows still in the episode, gathered
    into half the batch when they fit, and leave every row as the whole batch would: the same
    tokens, log-probs and next logits for the rows that run, the same cache."""
    config, params = scripted_policy(tok, margin=4.0)
    rc = dataclasses.replace(RC, samples_per_prompt=4)
    spec, inputs, _ = episode._prepare(config, tok, _examples(), simulator, rc,
                                       sampling.TopP(0.95), jax.random.key(0), None, None,
                                       None, 0, None)
    B = 8
    on = np.array([1, 0, 0, 1, 0, 0, 1, 0], bool)  # 3 of 8 rows still in the episode
    rng = np.random.default_rng(0)
    chunk = rng.integers(0, tok.vocab_size, (B, rc.max_obs_tokens)).astype(np.int32)
    chunk_mask = np.zeros_like(chunk, bool)
    chunk_mask[on, -12:] = True  # left-padded chunks on those rows only

    def run():
        jax.clear_caches()
        logits, cache = episode._jitted(episode.prefill, False)(
            spec, params, inputs.prompt_ids, inputs.prompt_mask)
        out, length, cache = episode._jitted(episode.policy_turn, True)(
            spec, 1, params, cache, logits, inputs.row_keys, ~on)
        logits, cache = episode._jitted(episode.insert, True)(spec, 1, params, cache, chunk,
                                                              chunk_mask)
        return jax.device_get((out, length, logits, cache))

    subset = run()
    monkeypatch.setattr(episode, "_subset_sizes", lambda spec, B: [B])  # the whole batch
    whole = run()
    jax.clear_caches()
    (o1, n1, l1, c1), (o2, n2, l2, c2) = subset, whole
    assert n1[on].min() > 0 and (n1[~on] == 0).all()
    np.testing.assert_array_equal(o1.tokens, o2.tokens)
    np.testing.assert_array_equal(n1, n2)
    np.testing.assert_allclose(o1.logprobs, o2.logprobs, atol=1e-5)
    np.testing.assert_allclose(l1[on], l2[on], atol=1e-4)
    np.testing.assert_array_equal(c1.key_mask, c2.key_mask)
    np.testing.assert_array_equal(c1.next_position, c2.next_position)
    assert int(c1.index) == int(c2.index)
    for a, b in zip(c1.k + c1.v, c2.k + c2.v, strict=True):  # the slots in use
        a, b = (np.asarray(x if x.dtype != np.uint16 else
                           jax.lax.bitcast_convert_type(x, jax.numpy.bfloat16), np.float32)
                for x in (a, b))
        mask = c1.key_mask[:, None, :, None]
        np.testing.assert_allclose(np.where(mask, a[:, :, :mask.shape[2]], 0),
                                   np.where(mask, b[:, :, :mask.shape[2]], 0), atol=2e-2)


def test_invalid_turns_get_the_message_until_max_turns(tok, simulator):
    config = tiny_config(tok.vocab_size)  # a random policy never closes a tag
    (batch, stats), stepped = _both(tok, (config, models.init_params(config, 2)), simulator,
                                    sampling.Greedy())
    _assert_same((batch, stats), stepped)
    np.testing.assert_array_equal(stats.invalid_actions, RC.max_turns)
    np.testing.assert_array_equal(stats.engine_calls, 0)
    P = batch.prompt_length
    text = tok.decode(batch.tokens[0, P:][batch.attention_mask[0, P:]])
    assert text.count("My previous action is invalid") == RC.max_turns
    np.testing.assert_array_equal(stats.f1, 0.0)


def test_policy_turns_match_the_text_host_loop(tok, simulator):
    """Same keys, same prompts: the in-graph engine's policy turns, actions and rewards are the
    text-level host loop's (which re-encodes documents as text, so the inserted tokens differ)."""
    config, params = scripted_policy(tok)
    host_batch, host = agent.rollout(config, params, tok, _examples(), simulator,
                                     rollout_config=RC, sampler=sampling.Greedy(), rng=0)
    batch, stats = episode.rollout(config, params, tok, _examples(), simulator,
                                   rollout_config=RC, sampler=sampling.Greedy(), rng=0)
    assert stats.turns == host.turns
    np.testing.assert_array_equal(stats.f1, host.f1)
    np.testing.assert_array_equal(stats.searches, host.searches)
    assert [[c.query for c in r] for r in stats.calls] == [[c.query for c in r]
                                                          for r in host.calls]
    np.testing.assert_array_equal(batch.loss_mask.sum(1), host_batch.loss_mask.sum(1))


@pytest.mark.parametrize("text,kind,content", [
    ("<think> hm </think> <search> capital of France </search>", "search",
     "capital of France"),
    ("<answer> Paris </answer>", "answer", "Paris"),
    ("<search> a <search> b </search>", "search", "a <search> b"),
    ("<answer> x </search>", "invalid", ""),
    ("just text", "invalid", ""),
    ("</search>", "invalid", ""),
])
def test_token_parse_agrees_with_the_text_parse(tok, text, kind, content):
    spec = episode.EpisodeSpec.make(
        tok, tiny_config(tok.vocab_size), tiny_config(tok.vocab_size), RC, sampling.Greedy(),
        sim_temperature=1.0, sim_new_tokens=8, topk=5, variant="finetuned", prompt_length=32,
        question_length=32, answer_length=8)
    ids = tok.encode(text)
    N = 32
    tokens = np.full((1, N), tok.pad_id, np.int32)
    tokens[0, :len(ids)] = ids
    k, start, size = jax.jit(episode.parse_turn, static_argnums=0)(
        spec, tokens, np.array([len(ids)]), np.array([True]))
    assert agent.parse_action(text).kind == kind
    assert {episode.SEARCH: "search", episode.ANSWER: "answer",
            episode.INVALID: "invalid"}[int(k[0])] == kind
    got = tok.decode(tokens[0, int(start[0]):int(start[0]) + int(size[0])]).strip()
    assert got == content == agent.parse_action(text).content


def test_simulator_prompt_assembly_is_one_everywhere(tok):
    """The device assembly (from the query's token span), the host `LLMSimulator` and the SFT
    examples build the same prompt ids."""
    prompt = search.SimulatorPrompt.make(tok)
    context = search.QueryContext("Who wrote Hamlet?", ("William Shakespeare",))
    turn = tok.encode("<search> Hamlet author </search>")
    spec = episode.EpisodeSpec.make(
        tok, tiny_config(tok.vocab_size), tiny_config(tok.vocab_size), RC, sampling.Greedy(),
        sim_temperature=1.0, sim_new_tokens=8, topk=5, variant="finetuned", prompt_length=32,
        question_length=32, answer_length=8)
    q = prompt.field_ids(tok, "question", context.question)
    a = prompt.field_ids(tok, "answer", context.golden_answers[0])
    inputs = episode.EpisodeInputs(
        prompt_ids=np.zeros((1, 32), np.int32), prompt_mask=np.ones((1, 32), bool),
        question_ids=np.pad(q, (0, 32 - len(q)))[None], question_len=np.array([len(q)]),
        answer_ids=np.pad(a, (0, 8 - len(a)))[None], answer_len=np.array([len(a)]),
        row_keys=jax.random.split(jax.random.key(0), 2), noise=np.float32(0))
    tokens = np.zeros((2, RC.max_new_tokens), np.int32)
    tokens[:, :len(turn)] = turn
    start = 3  # "<", "search", ">"
    size = len(tok.encode("<search> Hamlet author")) - start
    ids, mask = jax.jit(episode.simulator_prompts, static_argnums=0)(
        spec, tokens, np.array([start] * 2), np.array([size] * 2), np.array([True, False]),
        inputs)
    for row, useful in ((0, True), (1, False)):
        host = prompt.ids(tok, "Hamlet author", context, useful)
        assert list(np.asarray(ids[row])[np.asarray(mask[row])]) == host
    example = {"query": "Hamlet author", "question": context.question,
               "golden_answers": list(context.golden_answers), "label": "useful",
               "prompt": "unused", "target": "Doc 1: x"}
    data, _ = finetune.encode(tok, [example], 256)
    n = len(prompt.ids(tok, "Hamlet author", context, True))
    assert list(data["tokens"][0, :n]) == prompt.ids(tok, "Hamlet author", context, True)


def parrot_simulator(tok, block_answer: bool):
    """A simulator that writes " Paris" whatever it reads (every token has one embedding, and
    the head puts the margin on " Paris"), so only `block_answer` keeps it off a noisy page."""
    config = tiny_config(tok.vocab_size)
    params = dict(models.init_params(config, 3))
    E = config.hidden_size
    rng = np.random.default_rng(0)
    emb = np.zeros((tok.vocab_size, E), np.float32)
    emb[:, 0] = 1.0
    head = rng.normal(0, 0.02, (tok.vocab_size, E)).astype(np.float32)
    head[tok.encode(" Paris")[0], 0] = 10.0 / np.sqrt(E)
    params["embedder"] = {"embedding": jax.numpy.asarray(emb)}
    params["lm_head"] = {"weight": jax.numpy.asarray(head)}
    layer = dict(params["layer_0"])
    layer["attn"] = dict(layer["attn"], o_weight=jax.numpy.zeros_like(layer["attn"]["o_weight"]))
    layer["mlp"] = dict(layer["mlp"], down=jax.numpy.zeros_like(layer["mlp"]["down"]))
    params["layer_0"] = layer
    return search.LLMSimulator(config, params, tok, max_new_tokens=16, temperature=0.8,
                               block_answer=block_answer)


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_block_answer_keeps_the_answer_off_noisy_pages_on_every_path(tok, noise):
    """In one program, stepped, and in the text-level host loop: with `block_answer` a noisy
    page never holds the gold answer (" Paris"), a useful page still does; without it, the
    parrot writes the answer on both."""
    policy = scripted_policy(tok)
    kw = dict(rollout_config=RC, sampler=sampling.Greedy(), rng=0, noise_probability=noise)
    for block in (False, True):
        sim = parrot_simulator(tok, block)
        one = episode.rollout(*policy, tok, _examples(), sim, **kw)
        _assert_same(one, episode.rollout(*policy, tok, _examples(), sim, stepped=True, **kw))
        _, host = agent.rollout(*policy, tok, _examples(), sim, **kw)
        for stats in (one[1], host):
            calls = [c for row in stats.calls for c in row]
            assert len(calls) == 4 and all(c.useful == (noise == 0.0) for c in calls)
            has = ["Paris" in " ".join(c.documents) for c in calls]
            assert all(has) if (noise == 0.0 or not block) else not any(has), (block, noise)


def test_engines_say_whether_they_take_a_noise_probability_and_a_seed(simulator):
    """The trainer sets p_noise and reseeds through these protocols, not `hasattr`."""
    assert isinstance(simulator, search.NoiseControlled)
    assert isinstance(simulator, search.Reseedable)
    bm25 = search.BM25SearchEngine.build(
        [search.Passage("1", "Paris", "Paris is the capital of France.")], topk=1)
    assert not isinstance(bm25, search.NoiseControlled)
    assert not isinstance(bm25, search.Reseedable)


def test_a_repeated_query_gets_its_first_documents_on_every_path(tok, simulator):
    """`reuse_repeated_queries`: a row that searches "capital" twice reads the same page and
    coin both times, in one program, stepped and in the host loop; without it the simulator
    (p_noise 0.5, a new draw per call) writes a new page for the repeat."""
    policy = scripted_policy(tok, repeat_search=True)
    reuse = dataclasses.replace(RC, reuse_repeated_queries=True)
    one, stepped = _both(tok, policy, simulator, sampling.Greedy(), rc=reuse)
    _assert_same(one, stepped)
    _, host = agent.rollout(*policy, tok, _examples(), simulator, rollout_config=reuse,
                            sampler=sampling.Greedy(), rng=0)
    for stats in (one[1], host):
        assert [[c.query for c in row] for row in stats.calls] == [["capital"] * 2] * 4
        for first, again in stats.calls:
            assert (again.documents, again.useful) == (first.documents, first.useful)
            assert again.turn == 1 and first.documents
    batch, stats = one
    P = batch.prompt_length
    text = tok.decode(batch.tokens[0, P:][batch.attention_mask[0, P:]])
    blocks = text.split("<information>")[1:]
    assert len(blocks) == 2 and blocks[0].split("</information>")[0] == \
        blocks[1].split("</information>")[0]
    # Upstream's behaviour (the default): each call is drawn anew.
    for _, fresh in (_both(tok, policy, simulator, sampling.Greedy())[0],
                     agent.rollout(*policy, tok, _examples(), simulator, rollout_config=RC,
                                   sampler=sampling.Greedy(), rng=0)):
        assert any(again.documents != first.documents for first, again in fresh.calls)


def test_group_coins_give_a_group_one_coin_per_turn_on_every_path(tok, simulator):
    """`group_coins`: the two episodes of a group get the same useful/noisy coin at each turn
    (in one program, stepped and in the host loop, which flip the same coins from the same
    keys); over a few rollouts both kinds of coin come up, and without the option the
    episodes of some group draw differently."""
    policy = scripted_policy(tok, repeat_search=True)
    shared = dataclasses.replace(RC, group_coins=True)

    def coins(stats):  # [row][turn] -> useful
        return [[c.useful for c in row] for row in stats.calls]

    seen, apart = set(), False
    for rng in range(4):
        one, stepped = _both(tok, policy, simulator, sampling.Greedy(), rng=rng, rc=shared)
        _assert_same(one, stepped)
        _, host = agent.rollout(*policy, tok, _examples(), simulator, rollout_config=shared,
                                sampler=sampling.Greedy(), rng=rng)
        assert coins(one[1]) == coins(host)
        c = coins(host)
        assert [len(row) for row in c] == [2] * 4
        assert c[0] == c[1] and c[2] == c[3], c
        seen.update(u for row in c for u in row)
        (_, own), _ = _both(tok, policy, simulator, sampling.Greedy(), rng=rng)
        c = coins(own)
        apart |= c[0] != c[1] or c[2] != c[3]
    assert seen == {True, False}
    assert apart
