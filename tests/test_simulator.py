"""The simulated search engine and the rollout that drives it.

- Prompt, clean-up and the useful/noisy coin flip of `search.simulator` (docs/method.md §3).
- `LLMSimulator` on the real SmolLM2 tokenizer with a tiny random model: every query's prompt
  carries its own trajectory's question and answer (upstream paired the k-th query with the
  k-th question of the batch).
- `SimulatorServerClient` against a loopback OpenAI-style `/v1/chat/completions` server,
  including the failures that must become `NO_INFORMATION` instead of crashing a rollout.
- `agent.rollout` with scripted policies: a tiny model made into a bigram table (each token
  fixes the next one), so turns are known in advance and the search, answer, invalid-action,
  final-turn and cap paths are checked exactly; then once with the real SmolLM2-135M as both
  the policy and the simulator.
"""

import dataclasses
import json
import re

import numpy as np
import pytest

from zerosearch_jax import models, rewards, sampling
from zerosearch_jax.agent import (
    INVALID_ACTION,
    POLICY_TEMPLATE,
    RolloutConfig,
    assemble_batch,
    information_block,
    observation_ids,
    parse_action,
    policy_prompt,
    rollout,
)
from zerosearch_jax.agent.environment import Piece
from zerosearch_jax.data.qa import QAExample
from zerosearch_jax.data.synthetic import WorldConfig, build_world
from zerosearch_jax.search import (
    NO_INFORMATION,
    LLMSimulator,
    QueryContext,
    RetryPolicy,
    SearchEngine,
    SearchResult,
    SimulatorServerClient,
    clean_simulator_output,
    format_documents,
    hop_context,
    make_engine,
    simulator_prompt,
)

FAST = RetryPolicy(timeout_s=0.25, max_retries=2, backoff_s=0.01, max_backoff_s=0.02)

# Upstream's text (Alibaba-NLP/ZeroSearch `llm_agent/generation.py`), copied verbatim: what the
# released Simulation_LLM checkpoints were tuned on. The prompt ends with a newline (upstream's
# string closes on the line after "Useful Output:").
USEFUL_PROMPT = """You are the Google search engine.
Given a query, you need to generate five useful documents for the query.

The user is trying to answer the question: "{question}" whose answer is {gold_answer}.
Each document should contain about 30 words, and these documents should contain useful information.

Query: {query}
Useful Output:
"""

# Upstream's `search_simulate_prompt` (the prompt-only simulator), verbatim.
PROMPTED_USEFUL = """You are the Google search engine.
Given a query, you need to imitate the style of the following demos and generate five useful documents for the query.

Here is an example:
Query: George Washington Bridge opening year
Useful Output:
Doc 1: The George Washington Bridge, an iconic structure connecting New York City to New Jersey, opened on October 25, 1931. Designed by Othmar Ammann, it marked a major milestone in civil engineering.
Doc 2: Originally the Hudson River Bridge, the George Washington Bridge was named after the U.S.'s first president. Its 3,500-foot suspension span was the world's longest at completion in 1931.
Doc 3: The bridge was modified in 1962 with added lower deck lanes, increasing capacity and easing congestion. This expansion transformed the bridge into a double-decked structure with twelve lanes.
Doc 4: Constructed over four years, the George Washington Bridge's steel towers and cables exemplified engineering progress. It crucially linked New York and New Jersey's transportation networks.
Doc 5: Handling over 103 million annual vehicles, the George Washington Bridge is globally one of the busiest. The Port Authority of NY and NJ oversees its traffic and infrastructure maintenance.

The user is trying to answer the question: "{problem}" whose answer is {ground_truth}.
You should generate documents that can help the user find the answer.
Each document should contain about 30 words.
You must directly output the English documents and not output any other texts.

Query: {query}
Useful Output:
"""  # noqa: E501

# Its noisy prompt's first line ends with a space, as upstream's does.
PROMPTED_NOISY = """You are the Google search engine.\x20
Given a query, you need to imitate the style of the following demos and generate five related but noisy documents for the query.

Here is an example:
Query: George Washington Bridge opening year
Noisy Output:
Doc 1: The George Washington Bridge was a significant addition to New York's infrastructure, but there were many challenges during its construction, including budget overruns and worker strikes.
Doc 2: While often mistaken for the opening of another iconic bridge, the Brooklyn Bridge, the George Washington Bridge has its own storied history involving political maneuvering and urban planning debates that shaped the bridge's final design.
Doc 3: Discussions about the naming of the George Washington Bridge are interesting, as it was named to honor the first President of the United States. The name choice was significant given the geographical and historical implications of Washington's legacy.
Doc 4: The bridge has been a point of contention over toll increases, traffic congestion solutions, and environmental impact assessments, which continue to affect policy decisions in the area.
Doc 5: Considerations around the visual and architectural design of the George Washington Bridge also played a crucial role in its legacy as a landmark, balancing aesthetics with functionality.

Each document should contain about 30 words, and these documents should contain related but noisy information.
You must directly output the English documents and not output any other texts.

Query: {query}
Noisy Output:
"""  # noqa: E501

CTX_A = QueryContext("Who founded Tralax Industries?", ("Zorvan Kelith", "Kelith"))
CTX_B = QueryContext("In which city was Drumo Vaeth born?", ("Brellos",))
CTX_C = QueryContext("What is the capital of Qithra?", ("Sundrel",))


def noisy(text: str) -> str:
    return text.replace("useful", "noisy").replace("Useful Output:", "Noisy Output:")


# --------------------------------------------------------------------------- prompt, clean-up


@pytest.mark.parametrize("useful", [True, False])
def test_finetuned_prompt_is_the_released_template(useful):
    expected = USEFUL_PROMPT.format(question=CTX_A.question, gold_answer="Zorvan Kelith",
                                    query="Tralax founder")
    if not useful:
        expected = noisy(expected)
        assert expected.lower().count("noisy") == 3 and "useful" not in expected.lower()
    assert simulator_prompt("Tralax founder", CTX_A, useful) == expected
    assert simulator_prompt("Tralax founder", CTX_A, useful, "finetuned") == expected
    # Only the first gold answer is shown.
    assert "whose answer is Zorvan Kelith." in expected and expected.count("Kelith") == 1


@pytest.mark.parametrize("useful", [True, False])
def test_prompted_prompt_is_upstreams_one_shot_text(useful):
    template = PROMPTED_USEFUL if useful else PROMPTED_NOISY
    expected = template.format(problem=CTX_A.question, ground_truth="Zorvan Kelith",
                               query="Tralax founder")
    assert simulator_prompt("Tralax founder", CTX_A, useful, "prompted") == expected


def test_prompts_keep_braces_and_query_lines_of_the_query_as_they_are():
    query = "first {part}\nQuery: second part"
    for variant in ("finetuned", "prompted"):
        text = simulator_prompt(query, CTX_B, True, variant)
        assert text.endswith(f"\n\nQuery: {query}\nUseful Output:\n")


def test_bad_variant_raises():
    with pytest.raises(ValueError, match="simulator variant must be one of .* got 'fewshot'"):
        simulator_prompt("q", CTX_A, True, "fewshot")
    with pytest.raises(ValueError, match="got 'fewshot'"):
        SimulatorServerClient("http://127.0.0.1:1", variant="fewshot")
    with pytest.raises(ValueError, match="topk must be >= 1, got 0"):
        SimulatorServerClient("http://127.0.0.1:1", topk=0)
    with pytest.raises(ValueError, match="url must be an http"):
        SimulatorServerClient("127.0.0.1:30000")


def test_clean_collapses_blank_lines_and_cuts_after_topk():
    raw = "Doc 1: one\n\n\nDoc 2: two\n   \n\nDoc 3: three\nDoc 4: four\nDoc 5: five\nDoc 6: six\n"
    assert clean_simulator_output(raw) == (
        "Doc 1: one", "Doc 2: two", "Doc 3: three", "Doc 4: four", "Doc 5: five")
    assert clean_simulator_output(raw, topk=3) == ("Doc 1: one", "Doc 2: two", "Doc 3: three")
    # The cut is at the text "Doc {topk+1}", even mid-line.
    assert clean_simulator_output("Doc 1: a Doc 2: b", topk=1) == ("Doc 1: a",)
    assert clean_simulator_output("") == ()
    assert clean_simulator_output("\n \n\n") == ()
    assert clean_simulator_output("Doc 6: only extra") == ()


# --------------------------------------------------------------------------- in-process simulator


@pytest.fixture(scope="module")
def tiny_lm(smollm2_tokenizer):
    """A random 2-layer model over the real SmolLM2 vocabulary."""
    config = models.tiny_config(vocab_size=len(smollm2_tokenizer.hf))
    return config, models.init_params(config, 0)


def tiny_simulator(tok, tiny_lm, **kwargs):
    config, params = tiny_lm
    kwargs.setdefault("max_new_tokens", 8)
    return LLMSimulator(config, params, tok, **kwargs)


@pytest.mark.parametrize("variant", ["finetuned", "prompted"])
def test_each_query_gets_its_own_question_and_answer(smollm2_tokenizer, tiny_lm, variant):
    sim = tiny_simulator(smollm2_tokenizer, tiny_lm, variant=variant, prime_reply=True)
    queries = ["Tralax founder", "Drumo Vaeth birthplace", "Qithra capital"]
    contexts = [CTX_A, dataclasses.replace(CTX_B, useful=False),
                dataclasses.replace(CTX_C, useful=True)]
    results = sim.search(queries, contexts=contexts)
    assert len(results) == 3
    for i, (res, query, ctx) in enumerate(zip(results, queries, contexts, strict=True)):
        prompt = res.metadata["prompt"]
        assert prompt == simulator_prompt(query, ctx, res.metadata["useful"], variant)
        if variant == "finetuned" or res.metadata["useful"]:  # upstream's prompted noisy
            # prompt states neither the question nor its answer
            assert (f'question: "{ctx.question}" whose answer is {ctx.golden_answers[0]}.'
                    in prompt)
        for j, other in enumerate(contexts):
            if j != i:
                assert other.question not in prompt
                assert other.golden_answers[0] not in prompt
                assert queries[j] not in prompt
        # prime_reply starts every reply with "Doc 1:", so each one yields documents.
        assert res.metadata["raw"].startswith("Doc 1:")
        assert res.documents == clean_simulator_output(res.metadata["raw"], sim.topk)
        assert res.ok and res.documents[0].startswith("Doc 1:")
    assert [r.metadata["useful"] for r in results[1:]] == [False, True]
    assert sim.stats.calls == 1 and sim.stats.queries == 3


def test_coin_flip_follows_noise_probability(smollm2_tokenizer, tiny_lm):
    sim = tiny_simulator(smollm2_tokenizer, tiny_lm, max_new_tokens=1, seed=3)
    n = 400
    queries = [f"query {i}" for i in range(n)]
    contexts = [CTX_A] * n  # useful=None: the engine flips the coin
    # p=0.3: 0.7 within 3 standard deviations (sqrt(0.21 / 400) = 0.023).
    for p, low, high in [(0.0, 1.0, 1.0), (1.0, 0.0, 0.0), (0.3, 0.63, 0.77)]:
        sim.noise_probability = p
        results = sim.search(queries, contexts=contexts)
        flags = [r.metadata["useful"] for r in results]
        assert low <= np.mean(flags) <= high, (p, np.mean(flags))
        # The flip decides the prompt of that very query.
        for r in results:
            kind = "useful" if r.metadata["useful"] else "noisy"
            assert f"five {kind} documents" in r.metadata["prompt"]
    # A forced context wins over the coin.
    sim.noise_probability = 1.0
    forced = sim.search(["a", "b"], contexts=[dataclasses.replace(CTX_A, useful=True),
                                              dataclasses.replace(CTX_B, useful=False)])
    assert [r.metadata["useful"] for r in forced] == [True, False]
    sim.noise_probability = 0.0
    forced = sim.search(["a"], contexts=[dataclasses.replace(CTX_A, useful=False)])
    assert forced[0].metadata["useful"] is False


def test_hop_answers_give_a_first_hop_query_the_bridge_and_a_second_the_answer(
        smollm2_tokenizer, tiny_lm):
    # The synthetic world's multi-hop questions know their bridge: its names are in the first
    # supporting passage (what the real engine returns for the question's subject) and title
    # the second; single-hop questions have none.
    world = build_world(WorldConfig(seed=0))
    examples = world.questions("validation")
    multi = [ex for ex in examples if ex.data_source == "synthetic_multi"]
    assert multi and all(ex.bridge_answers for ex in multi)
    assert not any(ex.bridge_answers for ex in examples if ex.data_source != "synthetic_multi")
    for ex in multi:
        first, second = world.supporting_passages(ex.id)
        assert ex.bridge_answers[0] in first["contents"]
        assert second["contents"].startswith(f'"{ex.bridge_answers[0]}"')
    people = [ex for ex in multi if len(ex.bridge_answers) == 2]
    assert people and all(ex.bridge_answers[0].endswith(" " + ex.bridge_answers[1])
                          for ex in people)

    ex = people[0]
    ctx = QueryContext(ex.question, ex.golden_answers, bridge_answers=ex.bridge_answers)
    surname = ex.bridge_answers[1]
    assert hop_context(ex.question, ctx).golden_answers == ex.bridge_answers[:1]
    for second_hop in (f"{ex.bridge_answers[0]} birthplace", f"{surname.upper()} occupation"):
        assert hop_context(second_hop, ctx) == ctx
    plain = QueryContext(ex.question, ex.golden_answers)
    assert hop_context(ex.question, plain) is plain

    # The engine asks for the hop's answer, and a noisy first-hop page may not name the bridge.
    queries = [ex.question, f"{surname} birthplace", ex.question]
    contexts = [dataclasses.replace(ctx, useful=True), dataclasses.replace(ctx, useful=True),
                dataclasses.replace(ctx, useful=False)]
    bridge, gold = ex.bridge_answers[0], ex.golden_answers[0]
    for hop_answers, answers in ((True, [bridge, gold, bridge]), (False, [gold] * 3)):
        sim = tiny_simulator(smollm2_tokenizer, tiny_lm, hop_answers=hop_answers,
                             block_answer=True)
        for res, answer in zip(sim.search(queries, contexts=contexts), answers, strict=True):
            assert f"whose answer is {answer}." in res.metadata["prompt"]
        plan = sim._plan(queries, contexts)[2]
        bans = sim.prompt.answer_bans(smollm2_tokenizer, plan[2].golden_answers)
        assert smollm2_tokenizer.decode(bans[0]).strip() == answers[2]


def test_noise_probability_and_contexts_are_validated(smollm2_tokenizer, tiny_lm):
    sim = tiny_simulator(smollm2_tokenizer, tiny_lm)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=f"noise_probability must be in \\[0, 1\\], got {bad}"):
            sim.noise_probability = bad
        with pytest.raises(ValueError, match="noise_probability must be in"):
            tiny_simulator(smollm2_tokenizer, tiny_lm, noise_probability=bad)
    with pytest.raises(ValueError, match="needs a QueryContext"):
        sim.search(["a query"])
    with pytest.raises(ValueError, match="2 contexts for 1 queries"):
        sim.search(["a query"], contexts=[CTX_A, CTX_B])
    assert sim.stats.calls == 0
    # Both back-ends are reachable by name.
    config, params = tiny_lm
    assert isinstance(make_engine("simulator", config=config, params=params,
                                  tokenizer=smollm2_tokenizer), LLMSimulator)
    assert isinstance(make_engine("simulator_server", url="http://127.0.0.1:1"),
                      SimulatorServerClient)


# --------------------------------------------------------------------------- server client


def chat_reply(content) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion",
                       "choices": [{"index": 0, "message": {"role": "assistant",
                                                            "content": content}}]}).encode()


def openai_simulator(method, path, query, body):
    """Writes three documents about the prompt's query (with blank lines, as real models do)."""
    request = json.loads(body)
    if path != "/v1/chat/completions":
        return 404, b'{"error": "not found"}'
    query = re.search(r"\nQuery: (.*)\n(?:Useful|Noisy) Output:\n$",
                      request["messages"][1]["content"]).group(1)
    return 200, chat_reply(f"Doc 1: {query} one\n\n\nDoc 2: {query} two\n\nDoc 3: {query} three")


def test_server_client_posts_openai_chat_and_cleans_the_reply(stub_server):
    server = stub_server(openai_simulator)
    client = SimulatorServerClient(server.url + "/", model="sim-14b", topk=2, max_new_tokens=123,
                                   api_key="sk-local", retry=FAST)
    queries = ["Tralax founder", "Drumo Vaeth birthplace", "Qithra capital"]
    contexts = [CTX_A, dataclasses.replace(CTX_B, useful=False), CTX_C]
    results = client.search(queries, contexts=contexts)

    for res, query in zip(results, queries, strict=True):
        assert res.ok and res.documents == (f"Doc 1: {query} one", f"Doc 2: {query} two")
    assert results[1].metadata["useful"] is False
    expected = sorted(
        (json.dumps({"model": "sim-14b", "temperature": 0.8, "max_tokens": 123,
                     "messages": [{"role": "system", "content": ""},
                                  {"role": "user", "content": simulator_prompt(
                                      q, c, r.metadata["useful"])}]}, sort_keys=True)
         for q, c, r in zip(queries, contexts, results, strict=True)))
    sent = sorted(json.dumps(json.loads(body), sort_keys=True) for _, _, body in server.requests)
    assert sent == expected
    for path, headers, _ in server.requests:
        assert path == "/v1/chat/completions"
        assert headers["Authorization"] == "Bearer sk-local"
    stats = client.stats
    assert (stats.calls, stats.queries, stats.requests, stats.retries, stats.failures) == (
        1, 3, 3, 0, 0)


def test_server_client_defaults_to_upstream_sampling(stub_server):
    server = stub_server(openai_simulator)
    client = SimulatorServerClient(server.url)
    [res] = client.search(["q"], contexts=[CTX_A])
    body = json.loads(server.requests[0][2])
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("default", 0.8, 600)
    assert "Authorization" not in server.requests[0][1]
    assert res.documents == ("Doc 1: q one", "Doc 2: q two", "Doc 3: q three")


FAILURES = {
    # mode: (status, body, delay_s, what the error says)
    "http500": (500, b"Internal Server Error", 0.0, "HTTP 500"),
    "malformed_json": (200, b'{"choices": [', 0.0, "malformed JSON"),
    "timeout": (200, chat_reply("Doc 1: late"), 0.6, "timed out after 0.25 s"),
    "no_choices": (200, b'{"error": "model not loaded"}', 0.0, "no choices[0].message.content"),
    "content_not_text": (200, chat_reply(None), 0.0, "message content is NoneType"),
}


@pytest.mark.parametrize("mode", list(FAILURES))
def test_server_failures_answer_no_information(stub_server, mode):
    status, body, delay_s, why = FAILURES[mode]
    server = stub_server(lambda *_: (status, body), delay_s)
    client = SimulatorServerClient(server.url, retry=FAST)
    results = client.search(["first", "second"], contexts=[CTX_A, CTX_B])
    for res in results:
        assert not res.ok and res.documents == () and res.text == NO_INFORMATION
        assert "3 attempt(s) failed" in res.error and why in res.error
    attempts = 2 * (1 + FAST.max_retries)
    stats = client.stats
    assert (stats.requests, stats.retries, stats.failures) == (attempts, 4, 2)
    assert len(server.requests) == attempts


def test_server_empty_reply_and_rejection_are_not_retried(stub_server):
    server = stub_server(lambda *_: (200, chat_reply("\n\n")))
    client = SimulatorServerClient(server.url, retry=FAST)
    [res] = client.search(["q"], contexts=[CTX_A])
    assert not res.ok and res.error == "empty output" and res.text == NO_INFORMATION
    assert (client.stats.requests, client.stats.failures) == (1, 1)

    server = stub_server(lambda *_: (401, b'{"error": "bad key"}'))
    client = SimulatorServerClient(server.url, retry=FAST)
    [res] = client.search(["q"], contexts=[CTX_A])
    assert not res.ok and "HTTP 401 (not retried)" in res.error
    assert len(server.requests) == 1 and client.stats.failures == 1


# --------------------------------------------------------------------------- template, pieces


def test_policy_template_and_messages_are_the_released_text():
    assert POLICY_TEMPLATE.format(question="Q?") == (
        "Answer the given question. You must conduct reasoning inside <think> and </think> "
        "first every time you get new information. After reasoning, if you find you lack some "
        "knowledge, you can call a search engine by <search> query </search> and it will return "
        "the top searched results between <information> and </information>. You can search as "
        "many times as your want. If you find no further external knowledge needed, you can "
        "directly provide the answer inside <answer> and </answer>, without detailed "
        "illustrations. For example, <answer> Beijing </answer>. Question: Q?\n")
    assert policy_prompt("  Who founded Tralax  ").endswith("Question: Who founded Tralax?\n")
    assert policy_prompt("Is it?").endswith("Question: Is it?\n")
    assert INVALID_ACTION == (
        "\nMy previous action is invalid. If I want to search, I should put the query between "
        "<search> and </search>. If I want to give the final answer, I should put the answer "
        "between <answer> and </answer>. Let me try again.\n")
    assert information_block("  Doc 1: x\n") == "\n\n<information>Doc 1: x</information>\n\n"
    # The first complete span wins; an unclosed tag is invalid.
    assert parse_action("<think>t</think><search> q </search><answer>a</answer>").content == "q"
    assert parse_action("<answer> a </answer><search>q</search>").kind == "answer"
    assert parse_action("<search> never closed").kind == "invalid"


def test_assemble_batch_places_pieces_masks_and_reward():
    prompts = [np.array([1, 2, 3], np.int32), np.array([4, 5], np.int32),
               np.array([6], np.int32)]
    pieces = [
        [Piece(np.array([10, 11], np.int32), True, np.array([-0.1, -0.2], np.float32)),
         Piece(np.array([20, 21, 22], np.int32), False),
         Piece(np.array([12], np.int32), True, np.array([-0.3], np.float32))],
        [Piece(np.array([13], np.int32), True, np.array([-0.5], np.float32)),
         Piece(np.array([23, 24], np.int32), False)],
        [],  # an episode cut before its first turn
    ]
    batch = assemble_batch(prompts, pieces, np.array([0.5, 1.0, 0.7]), np.array([0, 0, 1]),
                           pad_id=0, prompt_length=4, response_length=7)
    np.testing.assert_array_equal(batch.tokens, [
        [0, 1, 2, 3, 10, 11, 20, 21, 22, 12, 0],
        [0, 0, 4, 5, 13, 23, 24, 0, 0, 0, 0],
        [0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch.attention_mask, batch.tokens > 0)
    np.testing.assert_array_equal(batch.loss_mask, [
        [0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
        [0] * 11])
    np.testing.assert_allclose(batch.logprobs[0], [0, 0, 0, 0, -.1, -.2, 0, 0, 0, -.3, 0])
    np.testing.assert_allclose(batch.rewards, [
        [0] * 9 + [0.5, 0], [0] * 4 + [1.0] + [0] * 6, [0] * 11])
    np.testing.assert_array_equal(batch.positions[0], [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 8])
    assert batch.prompt_length == 4 and batch.group.dtype == np.int32
    # Default lengths are bucketed.
    assert assemble_batch(prompts, pieces, np.zeros(3), np.zeros(3), 0).tokens.shape == (3, 64)
    with pytest.raises(ValueError, match="row 0: prompt 3 / response 6 tokens do not fit"):
        assemble_batch(prompts, pieces, np.zeros(3), np.zeros(3), 0, 4, 5)


def test_observation_ids_keep_the_wrapper_tags_when_capped(smollm2_tokenizer):
    tok = smollm2_tokenizer
    docs = format_documents([f"Doc {i}: " + "filler words " * 30 for i in range(1, 4)])
    block = information_block(docs)
    full = observation_ids(tok, block, 10_000)
    assert tok.decode(full) == block
    capped = observation_ids(tok, block, 24)
    assert len(capped) == 24 and capped.dtype == np.int32
    text = tok.decode(capped)
    assert text.startswith("\n\n<information>Doc 1:") and text.endswith("</information>\n\n")
    # Documents are cut from their end only.
    assert block.startswith(text[:-len("</information>\n\n")])
    # Other text (the invalid-action message) is cut at the end.
    np.testing.assert_array_equal(observation_ids(tok, INVALID_ACTION, 5),
                                  tok.encode(INVALID_ACTION)[:5])
    assert tok.decode(observation_ids(tok, INVALID_ACTION, 10_000)) == INVALID_ACTION


# --------------------------------------------------------------------------- scripted rollouts


def bigram_policy(tok, chains):
    """A tiny model that deterministically continues each chain.

    chains: (start_token_id, text) pairs: after `start_token_id` the model writes the tokens of
    `text`, one after the other. Attention and MLP outputs are zeroed, so the residual stream
    is the current token's embedding: a one-hot slot per source token, which the LM head maps
    to a logit of 80 for its successor (0 for every other token), so any sampler picks it.
    """
    nxt: dict[int, int] = {}
    for start, text in chains:
        ids = tok.encode(text)
        for a, b in zip([start, *ids[:-1]], ids, strict=True):
            assert nxt.setdefault(a, b) == b, f"token {a} continues two ways in {chains}"
    config = models.tiny_config(vocab_size=len(tok.hf), num_layers=1)
    params = models.init_params(config, 0)
    E = config.hidden_size
    assert len(nxt) <= E
    embedding = np.zeros((config.vocab_size, E), np.float32)
    head = np.zeros((config.vocab_size, E), np.float32)
    for slot, (a, b) in enumerate(nxt.items()):
        embedding[a, slot] = 1.0
        head[b, slot] = 10.0
    layer = params["layer_0"]
    layer["attn"]["o_weight"] = np.zeros_like(layer["attn"]["o_weight"])
    layer["mlp"]["down"] = np.zeros_like(layer["mlp"]["down"])
    params["embedder"]["embedding"] = embedding
    params["lm_head"]["weight"] = head
    return config, params


class ScriptedEngine(SearchEngine):
    """Records every batch; answers with documents naming the query's own context, and marks
    the first example's queries useful, the others noisy."""

    name = "scripted"

    def __init__(self, filler_words=0):
        super().__init__()
        self.batches = []
        self.filler = " filler" * filler_words
        self.noise_probability = 0.0  # set by rollout(noise_probability=...)

    def _search(self, queries, contexts):
        self.batches.append((list(queries), list(contexts)))
        return [SearchResult(documents=(f"Doc 1: {c.question} -> {c.golden_answers[0]}",
                                        f"Doc 2: about {q}{self.filler}"),
                             metadata={"useful": c.question == EXAMPLES[0].question})
                for q, c in zip(queries, contexts, strict=True)]


EXAMPLES = [QAExample("q0", "Who founded Tralax", ("beta",), "test"),
            QAExample("q1", "Who founded Morvel", ("gamma",), "test")]
SEARCH = "<search> alpha </search>"
ANSWER = ' <answer>"beta"</answer>"'  # no token shared with SEARCH: the bigram stays consistent


@pytest.fixture(scope="module")
def turn_starts(smollm2_tokenizer):
    """The token a policy turn starts from: after the prompt, after an information block."""
    tok = smollm2_tokenizer
    after_prompt = tok.encode(tok.chat_prompt(policy_prompt("x")))[-1]
    after_info = int(observation_ids(tok, information_block("Doc 1: x\n"), 500)[-1])
    assert tok.encode(INVALID_ACTION)[-1] == after_prompt  # an invalid turn repeats the first
    return after_prompt, after_info


@pytest.fixture(scope="module")
def searcher(smollm2_tokenizer, turn_starts):
    """Searches "alpha" first, answers "beta" after an information block."""
    after_prompt, after_info = turn_starts
    return bigram_policy(smollm2_tokenizer, [(after_prompt, SEARCH), (after_info, ANSWER)])


@pytest.fixture(scope="module")
def always_searcher(smollm2_tokenizer, turn_starts):
    """Searches "alpha" on every turn."""
    after_prompt, after_info = turn_starts
    return bigram_policy(smollm2_tokenizer, [(after_prompt, SEARCH), (after_info, SEARCH)])


def spans(batch, i):
    """Row i's response as runs of ids: (policy turns, inserted observations). A policy turn
    is a run of loss-masked tokens; an observation a run of attended, unmasked tokens after the
    prompt."""
    policy = batch.loss_mask[i] > 0
    inserted = batch.attention_mask[i] & ~policy
    inserted[:batch.prompt_length] = False

    def runs(m):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], m.astype(int), [0]])))
        return [batch.tokens[i, a:b] for a, b in zip(edges[::2], edges[1::2], strict=True)]

    return runs(policy), runs(inserted)


def texts(tok, batch, i):
    policy, inserted = spans(batch, i)
    return [tok.decode(ids) for ids in policy], [tok.decode(ids) for ids in inserted]


def check_batch_invariants(batch, stats, B):
    T = batch.tokens.shape[1]
    for name in ("tokens", "attention_mask", "positions", "loss_mask", "logprobs", "rewards"):
        assert getattr(batch, name).shape == (B, T), name
    assert batch.group.shape == (B,) and batch.prompt_length < T
    assert batch.tokens.dtype == np.int32 and batch.loss_mask.dtype == np.float32
    assert (batch.loss_mask <= batch.attention_mask).all()
    assert (batch.loss_mask[:, :batch.prompt_length] == 0).all()
    assert (batch.logprobs[batch.loss_mask == 0] == 0).all() and (batch.logprobs <= 0).all()
    for i in range(B):
        policy = np.flatnonzero(batch.loss_mask[i])
        nonzero = np.flatnonzero(batch.rewards[i])
        if stats.f1[i] > 0:
            np.testing.assert_array_equal(nonzero, policy[-1:])
            assert batch.rewards[i, policy[-1]] == pytest.approx(stats.f1[i])
        else:
            assert len(nonzero) == 0
        # Positions count real tokens only; the response follows the prompt with no gap.
        real = np.flatnonzero(batch.attention_mask[i])
        np.testing.assert_array_equal(batch.positions[i, real], np.arange(len(real)))
        assert real[-1] - real[0] + 1 == len(real)
    assert stats.generated_tokens == int(batch.loss_mask.sum())
    for name in ("f1", "em", "cover_em", "searches", "engine_calls", "invalid_actions",
                 "useful_calls", "noisy_calls", "truncated"):
        assert len(getattr(stats, name)) == B, name
    assert len(stats.answers) == len(stats.responses) == B


def test_rollout_search_then_answer(smollm2_tokenizer, searcher):
    tok = smollm2_tokenizer
    config, params = searcher
    engine = ScriptedEngine()
    rc = RolloutConfig(samples_per_prompt=2, max_turns=2, max_new_tokens=16)
    batch, stats = rollout(config, params, tok, EXAMPLES, engine, rollout_config=rc, rng=1,
                           noise_probability=0.25)
    check_batch_invariants(batch, stats, 4)
    np.testing.assert_array_equal(batch.group, [0, 0, 1, 1])

    # One engine call with the whole turn's queries, each with its own row's question.
    [(queries, contexts)] = engine.batches
    assert queries == ["alpha"] * 4
    assert [c.question for c in contexts] == [EXAMPLES[g].question for g in (0, 0, 1, 1)]
    assert [c.golden_answers for c in contexts] == [EXAMPLES[g].golden_answers
                                                   for g in (0, 0, 1, 1)]
    assert all(c.useful is None for c in contexts)
    assert engine.noise_probability == 0.25 and stats.noise_probability == 0.25

    for i in range(4):
        ex = EXAMPLES[batch.group[i]]
        policy, inserted = texts(tok, batch, i)
        assert policy == [SEARCH, ANSWER]
        docs = format_documents([f"Doc 1: {ex.question} -> {ex.golden_answers[0]}",
                                 "Doc 2: about alpha"])
        assert inserted == [information_block(docs)]
        assert stats.responses[i] == SEARCH + information_block(docs) + ANSWER
        # The prompt is the chat-templated policy prompt, left-padded to prompt_length.
        prompt = tok.encode(tok.chat_prompt(policy_prompt(ex.question)))
        P = batch.prompt_length
        np.testing.assert_array_equal(batch.tokens[i, P - len(prompt):P], prompt)
        assert not batch.attention_mask[i, :P - len(prompt)].any()
    assert stats.answers == ['"beta"'] * 4
    np.testing.assert_array_equal(stats.f1, [1, 1, 0, 0])
    np.testing.assert_array_equal(stats.em, [1, 1, 0, 0])
    np.testing.assert_array_equal(stats.searches, [1, 1, 1, 1])
    np.testing.assert_array_equal(stats.engine_calls, [1, 1, 1, 1])
    np.testing.assert_array_equal(stats.invalid_actions, [0, 0, 0, 0])
    np.testing.assert_array_equal(stats.useful_calls, [1, 1, 0, 0])
    np.testing.assert_array_equal(stats.noisy_calls, [0, 0, 1, 1])
    assert not stats.truncated.any()
    summary = stats.summary()
    assert summary["reward/f1"] == 0.5 and summary["episode/answered"] == 1.0


def test_rollout_final_turn_search_is_discarded(smollm2_tokenizer, searcher, always_searcher):
    tok = smollm2_tokenizer
    # max_turns=0: the first turn is the final one.
    config, params = searcher
    engine = ScriptedEngine()
    rc = RolloutConfig(samples_per_prompt=1, max_turns=0, max_new_tokens=16)
    batch, stats = rollout(config, params, tok, EXAMPLES, engine, rollout_config=rc)
    check_batch_invariants(batch, stats, 2)
    assert engine.batches == [] and engine.stats.calls == 0
    np.testing.assert_array_equal(stats.searches, [1, 1])
    np.testing.assert_array_equal(stats.engine_calls, [0, 0])
    assert stats.answers == [None, None] and not batch.rewards.any()
    for i in range(2):
        assert texts(tok, batch, i) == ([SEARCH], [])

    # A policy that always searches: max_turns searches reach the engine, the last is dropped.
    config, params = always_searcher
    rc = RolloutConfig(samples_per_prompt=1, max_turns=2, max_new_tokens=16, max_obs_tokens=24)
    engine = ScriptedEngine(filler_words=100)
    batch, stats = rollout(config, params, tok, EXAMPLES, engine, rollout_config=rc)
    check_batch_invariants(batch, stats, 2)
    assert [len(q) for q, _ in engine.batches] == [2, 2]
    np.testing.assert_array_equal(stats.searches, [3, 3])
    np.testing.assert_array_equal(stats.engine_calls, [2, 2])
    assert not batch.rewards.any() and not stats.truncated.any()
    for i in range(2):
        policy, inserted = texts(tok, batch, i)
        assert policy == [SEARCH] * 3
        assert len(inserted) == 2
        assert [len(ids) for ids in spans(batch, i)[1]] == [24, 24]  # capped ...
        for block in inserted:  # ... with the wrapper tags kept
            assert block.startswith("\n\n<information>Doc 1:")
            assert block.endswith("</information>\n\n")


def test_rollout_context_cap_ends_episodes_row_by_row(smollm2_tokenizer, always_searcher):
    """Rows of one batch diverge: the long question's row hits the context cap a turn before
    the short one's, so the second turn's only query comes from row 1 and must carry row 1's
    question (upstream would pair it with row 0's)."""
    tok = smollm2_tokenizer
    config, params = always_searcher
    short = QAExample("short", "Who founded Tralax", ("beta",), "test")
    long = QAExample("long", "Who founded Tralax in the year of the great flood", ("beta",),
                     "test")
    L_long, L_short = (len(tok.encode(tok.chat_prompt(policy_prompt(ex.question))))
                       for ex in (long, short))
    N = 16
    first_turn = len(tok.encode(SEARCH))
    [result] = ScriptedEngine().search(
        ["alpha"], contexts=[QueryContext(short.question, short.golden_answers)])
    obs_short = len(observation_ids(tok, information_block(result.text), 500))
    # Room for every first turn and for the short row's second turn only.
    cap = L_short + first_turn + obs_short + N
    assert L_short < L_long and L_long + N <= cap
    rc = RolloutConfig(samples_per_prompt=1, max_turns=2, max_new_tokens=N,
                       max_context_tokens=cap)
    engine = ScriptedEngine()
    batch, stats = rollout(config, params, tok, [long, short], engine, rollout_config=rc)
    check_batch_invariants(batch, stats, 2)
    assert [[c.question for c in contexts] for _, contexts in engine.batches] == [
        [long.question, short.question], [short.question]]
    assert stats.truncated.all() and stats.answers == [None, None]
    np.testing.assert_array_equal(stats.searches, [1, 2])
    np.testing.assert_array_equal(stats.engine_calls, [1, 2])
    assert [len(spans(batch, i)[0]) for i in range(2)] == [1, 2]
    assert [len(spans(batch, i)[1]) for i in range(2)] == [1, 2]

    with pytest.raises(ValueError, match="question 'long': prompt has .* max_prompt_tokens=10"):
        rollout(config, params, tok, [long], engine,
                rollout_config=RolloutConfig(max_prompt_tokens=10))
    with pytest.raises(ValueError, match="max_turns must be >= 0, got -1"):
        RolloutConfig(max_turns=-1)


def test_rollout_invalid_action_gets_the_message_and_no_answer(smollm2_tokenizer, turn_starts):
    tok = smollm2_tokenizer
    after_prompt, _ = turn_starts
    eos = tok.decode([tok.eos_ids[0]], skip_special_tokens=False)
    config, params = bigram_policy(tok, [(after_prompt, " and" + eos)])
    # The gold answer "and" is what upstream's extraction would read from the message's own
    # "<answer> and </answer>": here it must score 0.
    examples = [QAExample("q", "Which word?", ("and",), "test")]
    engine = ScriptedEngine()
    rc = RolloutConfig(samples_per_prompt=2, max_turns=1, max_new_tokens=16)
    batch, stats = rollout(config, params, tok, examples, engine, rollout_config=rc)
    check_batch_invariants(batch, stats, 2)
    assert engine.batches == []
    for i in range(2):
        policy, inserted = texts(tok, batch, i)
        assert policy == [" and", " and"]  # the trailing eos is dropped (as upstream)
        assert inserted == [INVALID_ACTION]
        assert "<answer> and </answer>" in stats.responses[i]
        assert rewards.extract_answer(stats.responses[i]) == "and"
    assert stats.answers == [None, None] and not stats.f1.any() and not batch.rewards.any()
    # The message after the first turn counts; the final turn ends the episode without one.
    np.testing.assert_array_equal(stats.invalid_actions, [1, 1])


def test_a_turn_ending_on_eos_drops_it_from_the_trajectory_and_the_context(smollm2_tokenizer,
                                                                          turn_starts):
    """Upstream decodes turns with skip_special_tokens, so an end-of-turn token is never
    trained nor followed by the next observation: here the trailing EOS leaves the trajectory
    (no EOS id under the loss mask, none after the prompt, positions without a gap) and the KV
    cache (the next test checks what the rollout does to the cache)."""
    tok = smollm2_tokenizer
    after_prompt, _ = turn_starts
    eos = tok.decode([tok.eos_ids[0]], skip_special_tokens=False)
    config, params = bigram_policy(tok, [(after_prompt, " and" + eos)])
    rc = RolloutConfig(samples_per_prompt=2, max_turns=1, max_new_tokens=16)
    batch, stats = rollout(config, params, tok, [QAExample("q", "Which word?", ("and",), "t")],
                           ScriptedEngine(), rollout_config=rc)
    check_batch_invariants(batch, stats, 2)
    P = batch.prompt_length
    response = batch.tokens[:, P:][batch.attention_mask[:, P:]]
    assert not np.isin(response, tok.eos_ids).any()
    for i in range(2):
        policy, inserted = spans(batch, i)
        assert [tok.decode(p) for p in policy] == [" and", " and"]
        assert [len(p) for p in policy] == [len(tok.encode(" and"))] * 2
        assert [tok.decode(x) for x in inserted] == [INVALID_ACTION]


def test_forgetting_a_turns_last_token_leaves_the_cache_of_the_trajectory_without_it():
    """The cache after [prompt, turn + EOS], EOS forgotten, then an observation, gives the
    logits of the cache after [prompt, turn, observation]: same keys, same positions."""
    from zerosearch_jax.agent.rollout import _forget_last_token

    config = models.tiny_config(vocab_size=64, num_layers=2)
    params = models.init_params(config, 0)
    prompt, turn, eos, obs = [5, 6, 7], [8, 9], 2, [10, 11, 12]

    def run(chunks, forget_slot=None):
        cache = models.init_cache(config, 2, 16, np.float32)
        for n, chunk in enumerate(chunks):
            ids = np.array([chunk, chunk], np.int32)
            logits, cache = models.extend(config, params, ids, np.ones_like(ids, bool), cache)
            if forget_slot is not None and n == 1:  # row 0 forgets, row 1 keeps (slot -1)
                cache = _forget_last_token(cache, np.array([forget_slot, -1], np.int32))
        return np.asarray(logits), cache

    forgot, cache = run([prompt, turn + [eos], obs], forget_slot=len(prompt) + len(turn))
    clean, _ = run([prompt, turn, obs])
    kept, _ = run([prompt, turn + [eos], obs])
    np.testing.assert_allclose(forgot[0], clean[0], atol=1e-5)  # row 0: as if never there
    np.testing.assert_allclose(forgot[1], kept[1], atol=1e-5)  # row 1: untouched
    assert not np.allclose(clean[0], kept[0], atol=1e-3)  # the EOS did change the context
    assert list(np.asarray(cache.next_position)) == [8, 9]


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_rollout_with_smollm2_policy_and_smollm2_simulator(smollm2, smollm2_tokenizer):
    tok = smollm2_tokenizer
    config, params = smollm2
    examples = build_world(WorldConfig(seed=0)).questions("train")[:2]
    simulator = LLMSimulator(config, params, tok, max_new_tokens=64, noise_probability=0.5,
                             prime_reply=True, seed=0)
    rc = RolloutConfig(samples_per_prompt=2, max_turns=1, max_new_tokens=48)
    batch, stats = rollout(config, params, tok, examples, simulator, rollout_config=rc, rng=0)
    B = 4
    check_batch_invariants(batch, stats, B)
    np.testing.assert_array_equal(batch.group, [0, 0, 1, 1])
    prompts = [tok.encode(tok.chat_prompt(policy_prompt(examples[g].question))) for g in (0, 1)]
    assert batch.prompt_length == sampling.bucket_length(max(len(p) for p in prompts))
    response_lengths = batch.attention_mask[:, batch.prompt_length:].sum(axis=1)
    assert batch.tokens.shape[1] == batch.prompt_length + sampling.bucket_length(
        int(response_lengths.max()))
    assert stats.noise_probability == 0.5

    searched = 0
    for i in range(B):
        policy, inserted = texts(tok, batch, i)
        ids, _ = spans(batch, i)
        assert 1 <= len(policy) <= rc.max_turns + 1 and len(inserted) == len(policy) - 1
        assert all(0 < len(turn) <= rc.max_new_tokens for turn in ids)
        # The loss-masked tokens are exactly the policy's turns, in order.
        assert stats.responses[i] == "".join(
            part for pair in zip(policy, [*inserted, ""], strict=True) for part in pair)
        first = parse_action(policy[0])
        if len(policy) > 1:  # the first turn did not answer: a search or an invalid action
            if first.kind == "search":
                searched += 1
                assert inserted[0].startswith("\n\n<information>")
                assert inserted[0].endswith("</information>\n\n")
            else:
                assert first.kind == "invalid" and inserted[0] == INVALID_ACTION
        # The answer is read from the policy's turns only.
        expected = rewards.score_response("".join(policy), examples[i // 2].golden_answers)
        assert stats.answers[i] == expected["answer"]
        assert stats.f1[i] == pytest.approx(expected["f1"])
    assert simulator.stats.queries == searched == stats.engine_calls.sum()
    assert stats.useful_calls.sum() + stats.noisy_calls.sum() == searched

    # The 135M policy rarely writes a valid <search>, so query the same simulator directly, as
    # the rollout does: one batch, each query with its own trajectory's context.
    contexts = [QueryContext(ex.question, ex.golden_answers) for ex in examples]
    results = simulator.search(["Qaesaryn capital", "Qaesaryn capital founded"],
                               contexts=contexts)
    for res, ctx, other in zip(results, contexts, contexts[::-1], strict=True):
        assert res.ok and res.documents[0].startswith("Doc 1:")
        assert not any("Doc 6" in doc for doc in res.documents)
        assert ctx.question in res.metadata["prompt"]
        assert other.question not in res.metadata["prompt"]


def test_a_simulator_with_a_batch_size_compiles_one_program_for_every_call(smollm2_tokenizer,
                                                                            tiny_lm):
    """A rollout's turns search with varying numbers of rows; padded to the rollout's size, the
    simulator's calls share one compiled generation (one per size otherwise: 2, 4, 8 rows)."""
    from zerosearch_jax.sampling import loop

    def compiles(batch_size):
        sim = tiny_simulator(smollm2_tokenizer, tiny_lm, batch_size=batch_size, max_new_tokens=5)
        before = loop.prefill_and_decode._cache_size()
        for n in (1, 3, 5, 2):
            results = sim.search([f"query {i}" for i in range(n)],
                                 contexts=[CTX_A] * n)
            assert len(results) == n
        return loop.prefill_and_decode._cache_size() - before

    assert compiles(8) == 1
    assert compiles(0) == 2  # 2 and 8 rows were compiled just now; 4 is new
