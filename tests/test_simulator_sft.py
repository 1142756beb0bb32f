"""Simulator tuning: JSONL logs, labelling, collection (resume, call cap), SFT, report, pipeline."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zerosearch_jax import agent, models, search, training
from zerosearch_jax.data import jsonl, synthetic
from zerosearch_jax.search.base import SearchEngine
from zerosearch_jax.simulator_sft import collect as collect_lib
from zerosearch_jax.simulator_sft import finetune as finetune_lib
from zerosearch_jax.simulator_sft import label as label_lib
from zerosearch_jax.simulator_sft import report as report_lib
from zerosearch_jax.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# Append-only JSONL.
# ------------------------------------------------------------------------------------------------


def test_append_only_jsonl_drops_a_torn_last_line_and_keeps_the_rest(tmp_path, caplog):
    path = tmp_path / "log.jsonl"
    log = jsonl.AppendOnlyJSONL(path)
    log.append([{"id": 1}, {"id": 2}])
    with open(path, "a") as f:
        f.write('{"id": 3, "calls": [')  # killed mid-write
    reopened = jsonl.AppendOnlyJSONL(path)
    assert [r["id"] for r in reopened.records] == [1, 2]
    assert "torn last line" in caplog.text
    reopened.append([{"id": 3}])
    assert [r["id"] for r in jsonl.read_jsonl(path)] == [1, 2, 3]


def test_append_only_jsonl_refuses_a_corrupted_middle_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"id": 1}\nnot json\n{"id": 3}\n')
    with pytest.raises(jsonl.JSONLError, match=r"log.jsonl:2"):
        jsonl.AppendOnlyJSONL(path)
    assert path.read_text() == '{"id": 1}\nnot json\n{"id": 3}\n'  # nothing was truncated


# ------------------------------------------------------------------------------------------------
# Labelling.
# ------------------------------------------------------------------------------------------------


def test_document_text_snippet_and_containment():
    assert label_lib.document_text('Doc 3(Title: "Paris") Paris is big.') == "Paris is big."
    assert label_lib.document_text("Doc 12: Some snippet") == "Some snippet"
    text = ("Vropika is a country. Its capital is Faezhalo, a port. The economy depends on "
            "wool. People are restless.")
    # The window starts at the sentence sharing most words with the query.
    assert label_lib.snippet(text, "capital of Vropika Faezhalo", 6) == \
        "Its capital is Faezhalo, a port."
    assert label_lib.snippet(text, "economy wool", 100).startswith("The economy depends")
    assert label_lib.contains_answer("The capital is Faezhalo.", ["faezhalo"])
    assert not label_lib.contains_answer("Faezhalostan is elsewhere", ["Faezhalo"])  # words
    assert label_lib.contains_answer("born in the year 1884", ["1884", "x"])


def _pair(docs, answers=("Faezhalo",), correct=None, label=None, pid="p"):
    return label_lib.Pair("What is the capital of Vropika?", tuple(answers),
                          "capital of Vropika", tuple(docs), correct, label, pid)


def test_containment_judge_builds_useful_and_noisy_examples_from_one_call():
    docs = (["Doc 1: Vropika's capital is Faezhalo."]
            + [f"Doc {i}: Unrelated text number {i}." for i in range(2, 8)])
    cfg = label_lib.LabelConfig(judge="containment", topk=5, doc_words=30, balance=False)
    examples = label_lib.label_pairs([_pair(docs)], cfg)
    by_label = {e["label"]: e for e in examples}
    assert set(by_label) == {"useful", "noisy"}
    useful, noisy = by_label["useful"], by_label["noisy"]
    assert useful["target"].splitlines()[0] == "Doc 1: Vropika's capital is Faezhalo."
    assert len(useful["target"].splitlines()) == 5
    # The noisy target: the five best documents without the answer, renumbered.
    assert noisy["target"].splitlines() == [f"Doc {i - 1}: Unrelated text number {i}."
                                            for i in range(2, 7)]
    assert "generate five noisy documents" in noisy["prompt"]
    assert "whose answer is Faezhalo" in useful["prompt"]
    # Exactly the text the simulator is prompted with at RL time (upstream's, to the newline).
    from test_simulator import USEFUL_PROMPT

    assert useful["prompt"] == USEFUL_PROMPT.format(
        question="What is the capital of Vropika?", gold_answer="Faezhalo",
        query="capital of Vropika")


def test_answer_focus_keeps_the_answer_in_useful_snippets_and_makes_hard_negatives():
    page = ("Vropika is a country in the north. It has many rivers and old bridges. Its capital "
            "is Faezhalo, a port. The economy depends on wool.")
    docs = [f"Doc 1: {page}"] + [f"Doc {i}: Unrelated text number {i}." for i in range(2, 8)]
    plain = label_lib.LabelConfig(judge="containment", doc_words=8, balance=False)
    focus = dataclasses.replace(plain, answer_focus=True)
    # The query-focused snippet of the page stops before the answer: no useful example.
    assert [e["label"] for e in label_lib.label_pairs([_pair(docs)], plain)] == ["noisy"]
    by_label = {e["label"]: e for e in label_lib.label_pairs([_pair(docs)], focus)}
    # Useful: the page's snippet starts at the answer's sentence instead.
    assert by_label["useful"]["target"].splitlines()[0] == \
        "Doc 1: Its capital is Faezhalo, a port. The economy"
    # Noisy: the same page, first, with the answer's sentence removed (a hard negative).
    noisy = by_label["noisy"]["target"].splitlines()
    assert noisy[0] == "Doc 1: Vropika is a country in the north. It"
    assert noisy[1:] == [f"Doc {i}: Unrelated text number {i}." for i in range(2, 6)]
    assert not any(label_lib.contains_answer(d, ["Faezhalo"]) for d in noisy)
    # A page made only of answer sentences leaves nothing answer-free.
    assert label_lib.answerless_snippet("Faezhalo is the capital.", "capital", ["Faezhalo"],
                                        8) == ""
    assert label_lib.answer_snippet("No answer here.", ["Faezhalo"], 8) == ""


def test_calls_with_too_few_documents_are_dropped_and_balance_needs_both_classes():
    cfg = label_lib.LabelConfig(judge="containment", topk=5)
    short = _pair(["Doc 1: Faezhalo", "Doc 2: other"])
    assert label_lib.label_pairs([short], label_lib.LabelConfig(balance=False)) == []
    all_useful = _pair([f"Doc {i}: Faezhalo {i}" for i in range(1, 6)])
    with pytest.raises(ValueError, match="cannot balance: 1 useful and 0 noisy"):
        label_lib.label_pairs([all_useful], cfg)


def test_trajectory_judge_balance_and_given_labels():
    docs = [f"Doc {i}: text {i}" for i in range(1, 6)]
    pairs = ([_pair(docs, correct=True, pid=f"u{i}") for i in range(5)]
             + [_pair(docs, correct=False, pid=f"n{i}") for i in range(2)]
             + [_pair(docs, correct=True, label="noisy", pid="given")])
    out = label_lib.label_pairs(pairs, label_lib.LabelConfig(judge="trajectory", seed=1))
    labels = [e["label"] for e in out]
    assert labels.count("useful") == labels.count("noisy") == 3  # balanced down to 3
    assert {e["judge"] for e in out if e["id"] == "given/noisy"} <= {"given"}
    with pytest.raises(ValueError, match="no trajectory outcome"):
        label_lib.label_pairs([_pair(docs)], label_lib.LabelConfig(judge="trajectory"))


def test_llm_judge_over_an_openai_compatible_endpoint(stub_server):
    def respond(method, path, query, body):
        prompt = json.loads(body)["messages"][0]["content"]
        if "BROKEN" in prompt:
            return 500, b"oops"
        return 200, json.dumps({"choices": [{"message": {
            "content": "Yes." if "Faezhalo" in prompt.split("Search results:")[1] else "no"}}]}
        ).encode()

    server = stub_server(respond)
    judge = label_lib.OpenAIJudge(server.url, retry=search.RetryPolicy(max_retries=0))
    docs_yes = [f"Doc {i}: Faezhalo {i}" for i in range(1, 6)]
    docs_no = [f"Doc {i}: nothing {i}" for i in range(1, 6)]
    pairs = [_pair(docs_yes, pid="a"), _pair(docs_no, pid="b"),
             _pair([f"Doc {i}: BROKEN" for i in range(1, 6)], pid="c")]
    out = label_lib.label_pairs(pairs, label_lib.LabelConfig(judge="llm", balance=False),
                                llm_judge=judge)
    assert sorted((e["id"], e["label"]) for e in out) == [("a/useful", "useful"),
                                                           ("b/noisy", "noisy")]
    assert judge.failures == 1  # the failing request is dropped and counted


def test_load_pairs_reports_malformed_lines_with_their_number(tmp_path, caplog):
    path = tmp_path / "pairs.jsonl"
    good = {"question": "q?", "golden_answers": ["a"], "query": "q", "documents": ["d1", "d2"]}
    path.write_text("\n".join([json.dumps(good), "{not json", json.dumps({**good, "query": ""}),
                               json.dumps({**good, "label": "meh"}),
                               json.dumps({**good, "answer": "b", "golden_answers": None})]))
    with pytest.raises(jsonl.JSONLError, match=r"pairs.jsonl:2: invalid JSON"):
        label_lib.load_pairs(str(path), on_error="raise")
    pairs = label_lib.load_pairs(str(path), on_error="skip")
    assert [p.golden_answers for p in pairs] == [("a",)]
    for line in ("pairs.jsonl:2", "pairs.jsonl:3", "pairs.jsonl:4", "pairs.jsonl:5"):
        assert line in caplog.text


def test_heldout_split_is_by_question():
    ex = [{"question": f"q{i % 7}", "id": str(i)} for i in range(30)]
    train, held = label_lib.split_heldout(ex, 0.3, seed=0)
    assert len(train) + len(held) == 30 and held
    assert not {e["question"] for e in train} & {e["question"] for e in held}


# ------------------------------------------------------------------------------------------------
# Collection: resume without duplicates or losses, call cap.
# ------------------------------------------------------------------------------------------------


class _Failing(SearchEngine):
    """Wraps an engine and raises (a crashed back-end) on call number `fail_at`."""

    def __init__(self, engine, fail_at):
        super().__init__()
        self.engine, self.fail_at, self.n = engine, fail_at, 0

    def _search(self, queries, contexts):
        self.n += 1
        if self.n == self.fail_at:
            raise ConnectionError("back-end crashed")
        return self.engine.search(queries, contexts=contexts)


@pytest.fixture(scope="module")
def world_engine():
    world = synthetic.build_world(synthetic.WorldConfig(seed=0))
    passages = [search.Passage.from_contents(p["id"], p["contents"]) for p in world.passages]
    return world, search.BM25SearchEngine.build(passages, topk=6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_tokenizer):
    from train_utils import tiny_policy_dir

    path = tiny_policy_dir(tmp_path_factory.mktemp("tiny"), smollm2_tokenizer)
    config, params = models.load_pretrained(path, dtype=jnp.float32)
    return path, config, params, Tokenizer.from_pretrained(path)


ROLLOUT = agent.RolloutConfig(samples_per_prompt=1, max_turns=1, max_new_tokens=8,
                              max_obs_tokens=32)


def test_interrupted_collection_resumes_without_duplicates_or_losses(tmp_path, world_engine,
                                                                     tiny):
    world, engine = world_engine
    _, config, params, tok = tiny
    questions = world.questions("train")[:10]
    out = str(tmp_path / "collect.jsonl")
    cc = collect_lib.CollectConfig(batch_size=4, query_sources=("question",))
    # The policy turns of a random tiny model rarely search, so add the "question" source only;
    # the third engine call (third batch) crashes.
    with pytest.raises(ConnectionError):
        collect_lib.run_collection(config, params, tok, questions, _Failing(engine, 3), out, cc,
                                   rollout_config=ROLLOUT, progress=False)
    first = jsonl.read_jsonl(out)
    assert [r["id"] for r in first] == [q.id for q in questions[:8]]
    with open(out, "a") as f:
        f.write('{"id": "torn')  # and a kill in the middle of a write
    stats = collect_lib.run_collection(config, params, tok, questions, engine, out, cc,
                                       rollout_config=ROLLOUT, progress=False)
    records = jsonl.read_jsonl(out)
    assert [r["id"] for r in records] == [q.id for q in questions]  # each once, in order
    assert records[:8] == first  # nothing already written changed
    assert stats["new_questions"] == 2 and stats["questions"] == 10
    assert all(r["calls"][-1]["source"] == "question" and r["calls"][-1]["ok"]
               and len(r["calls"][-1]["documents"]) == 6 for r in records)


def test_collection_never_exceeds_the_call_cap_across_resumes(tmp_path, world_engine, tiny):
    world, engine = world_engine
    _, config, params, tok = tiny
    questions = world.questions("train")[:12]
    out = str(tmp_path / "collect.jsonl")
    counting = _Failing(engine, fail_at=-1)
    cc = collect_lib.CollectConfig(batch_size=4, query_sources=("question",), max_calls=6)
    stats = collect_lib.run_collection(config, params, tok, questions, counting, out, cc,
                                       rollout_config=ROLLOUT, progress=False)
    assert stats["stopped_by_budget"]
    sent = sum(len(r["calls"]) for r in jsonl.read_jsonl(out))
    reached = counting.stats.queries
    assert reached == 6 and sent == 8  # 2 calls of the second batch were refused
    again = collect_lib.run_collection(config, params, tok, questions, counting, out, cc,
                                       rollout_config=ROLLOUT, progress=False)
    assert counting.stats.queries == 6 and again["new_questions"] == 0


# ------------------------------------------------------------------------------------------------
# Fine-tuning.
# ------------------------------------------------------------------------------------------------


def _examples(n=6):
    return [label_lib.make_example(
        _pair([f"Doc {j}: x" for j in range(5)], pid=str(i)), i % 2 == 0,
        [f"Faezhalo fact {i} {j}" for j in range(5)], "given") for i in range(n)]


def test_encode_masks_exactly_the_target_and_end_of_turn(tiny):
    _, _, _, tok = tiny
    ex = _examples(1)[0]
    data, cut = finetune_lib.encode(tok, [ex], 200)
    # The prompt is the simulator's token assembly, as the in-graph rollout prompts it.
    context = search.QueryContext(ex["question"], tuple(ex["golden_answers"]))
    prompt = search.SimulatorPrompt.make(tok).ids(tok, ex["query"], context,
                                                  ex["label"] == "useful")
    assert tok.decode(prompt, skip_special_tokens=False) == tok.chat_prompt(ex["prompt"],
                                                                            system="")
    target = tok.encode(ex["target"]) + [tok.eos_ids[0]]
    n = len(prompt) + len(target)
    assert cut == 0
    assert data["tokens"][0, :n].tolist() == prompt + target
    assert data["loss_mask"][0].tolist() == [0.0] * len(prompt) + [1.0] * len(target) + \
        [0.0] * (200 - n)
    assert data["attention_mask"][0].sum() == n
    short, cut = finetune_lib.encode(tok, [ex], len(prompt) + 3)
    assert cut == 1 and short["loss_mask"].sum() == 3
    with pytest.raises(ValueError, match="max_length"):
        finetune_lib.encode(tok, [ex], len(prompt))


def test_answer_weight_weighs_exactly_the_answer_tokens_of_useful_targets(tiny):
    _, _, _, tok = tiny
    # _examples: even ids useful; every target holds the gold answer "Faezhalo" in each line.
    examples = _examples(2)
    plain, _ = finetune_lib.encode(tok, examples, 256)
    weighted, _ = finetune_lib.encode(tok, examples, 256, answer_weight=5.0)
    assert examples[0]["label"] == "useful" and examples[1]["label"] == "noisy"
    # The noisy target is untouched; the useful one changes on its answer tokens only.
    np.testing.assert_array_equal(weighted["loss_mask"][1], plain["loss_mask"][1])
    changed = weighted["loss_mask"][0] != plain["loss_mask"][0]
    assert set(weighted["loss_mask"][0][changed].tolist()) == {5.0}
    answer = [tok.encode(" Faezhalo"), tok.encode("Faezhalo")]
    spans = np.zeros(256, bool)
    ids = weighted["tokens"][0].tolist()
    for seq in answer:
        for i in range(256 - len(seq) + 1):
            if ids[i:i + len(seq)] == seq and plain["loss_mask"][0, i] > 0:
                spans[i:i + len(seq)] = True
    # Five documents, each naming the answer once: five spans, and nothing else weighed.
    assert spans.any() and changed.tolist() == spans.tolist()
    assert finetune_lib.answer_spans([1, 2, 3, 2, 3], [[2, 3]]).tolist() == [
        False, True, True, True, True]
    with pytest.raises(ValueError, match="answer_weight"):
        finetune_lib.SFTConfig(answer_weight=0.5)


def test_sft_loss_is_the_masked_nll_and_tuning_lowers_it(tmp_path, tiny):
    _, config, params, tok = tiny
    data, _ = finetune_lib.encode(tok, _examples(4), 256)
    batch = {k: jnp.asarray(v) for k, v in data.items()}
    loss, (nll, count) = finetune_lib.sft_loss(config, params, batch, remat=False)
    logp, _ = training.policy_logprobs(config, params, batch["tokens"],
                                       batch["attention_mask"], batch["positions"])
    assert float(count) == float(data["loss_mask"].sum())
    np.testing.assert_allclose(float(nll), -float((logp * batch["loss_mask"]).sum()), rtol=1e-5)

    sc = finetune_lib.SFTConfig(steps=12, batch_size=2, max_length=256, lr=1e-2,
                                compute_dtype="float32", remat=False, checkpoint_every=6)
    # The tuning consumes (donates) the parameters it starts from: give it a copy, the
    # module's other tests read the fixture's.
    tuned = finetune_lib.run_finetune(config, jax.tree.map(jnp.copy, params), tok,
                                      _examples(4), str(tmp_path), sc,
                                      progress=False)
    after, _ = finetune_lib.sft_loss(config, tuned, batch, remat=False)
    assert float(after) < 0.7 * float(loss)
    losses = [json.loads(line)["train/loss"] for line in open(tmp_path / "metrics.jsonl")]
    assert len(losses) == 12 and losses[-1] < losses[0]


@pytest.mark.parametrize("pack_length,micro", [(0, 2), (256, 1), (512, 1), (300, 2)])
def test_a_packed_sft_step_equals_the_padded_one(tiny, pack_length, micro):
    """Several examples a packed row (segment ids, fewer micro-batches in use) give the loss
    and update of one example a padded row, to float tolerance."""
    _, config, params, tok = tiny
    data, _ = finetune_lib.encode(tok, _examples(4), 256)
    real = int(data["attention_mask"].sum())

    def step(**kw):
        sc = finetune_lib.SFTConfig(steps=4, batch_size=4, max_length=256, lr=1e-2,
                                    compute_dtype="float32", remat=False, **kw)
        opt = training.make_optimizer(sc.lr, sc.steps, weight_decay=0.0)
        state = training.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                    opt_state=opt.init(params))
        layout = sc.plan(data["attention_mask"])
        return finetune_lib.sft_step(config, sc, opt, state, data, layout)

    ref_state, ref = step(pack_length=0, micro_batch_size=4)  # one micro-batch of 4 rows
    state, m = step(pack_length=pack_length, micro_batch_size=micro)
    for k in ("loss", "grad_norm", "target_tokens", "real_tokens"):
        np.testing.assert_allclose(float(m[k]), float(ref[k]), rtol=2e-5, err_msg=k)
    assert float(m["real_tokens"]) == real
    assert real <= float(m["token_slots"]) and float(ref["token_slots"]) == 4 * 256
    if pack_length == 512:  # two examples a row: half the slots of one per 256-token row
        assert float(m["token_slots"]) == 2 * 512
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params), strict=True))
    assert diff < 1e-5


def test_sft_resumes_past_a_damaged_newest_checkpoint_to_the_same_weights(tmp_path, tiny):
    """A tuning killed after its step-4 checkpoint was damaged resumes from step 2 (the damaged
    step set aside, as the RL trainer does) and ends with the uninterrupted run's weights."""
    _, config, params, tok = tiny
    data, _ = finetune_lib.encode(tok, _examples(4), 256)
    sc = finetune_lib.SFTConfig(steps=6, batch_size=2, max_length=256, lr=1e-2,
                                compute_dtype="float32", remat=False, checkpoint_every=2,
                                keep=3)

    def tune(workdir):
        return finetune_lib.tune_on_arrays(config, jax.tree.map(jnp.copy, params), data,
                                           str(workdir), sc, progress=False)

    whole = tune(tmp_path / "whole")
    tune(tmp_path / "killed")
    ckpt = tmp_path / "killed" / "checkpoints"
    shutil.rmtree(ckpt / "6")  # killed before step 6 was saved
    target = max((p for p in (ckpt / "4" / "state").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 3])
    resumed = tune(tmp_path / "killed")
    assert (ckpt / "4.corrupt").exists()
    steps = [json.loads(line)["step"] for line in open(tmp_path / "killed" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]  # the rows after step 2 were written again, once
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_sft_refuses_a_pack_length_shorter_than_an_example(tmp_path, tiny):
    _, config, params, tok = tiny
    data, _ = finetune_lib.encode(tok, _examples(2), 256)
    longest = int(data["attention_mask"].sum(1).max())
    sc = finetune_lib.SFTConfig(steps=1, batch_size=2, max_length=256,
                                pack_length=longest - 1)
    with pytest.raises(ValueError, match="pack_length"):
        finetune_lib.tune_on_arrays(config, params, data, str(tmp_path), sc, progress=False)


# ------------------------------------------------------------------------------------------------
# Report.
# ------------------------------------------------------------------------------------------------


def test_output_quality_format_and_containment():
    five = "\n".join(f"Doc {i}: word word Faezhalo" for i in range(1, 6))
    assert report_lib.output_quality(five, ["Faezhalo"]) == {
        "contains_answer": 1.0, "format_valid": 1.0, "words_per_doc": 3.0}
    # Cut at Doc 6, blank lines collapsed: still valid.
    assert report_lib.output_quality(five.replace("\n", "\n\n") + "\nDoc 6: more",
                                     ["x"])["format_valid"] == 1.0
    bad = "Doc 1: a\nDoc 3: b\nDoc 4: c\nDoc 5: d\nDoc 6: e"
    assert report_lib.output_quality(bad, ["x"])["format_valid"] == 0.0
    assert report_lib.output_quality("Doc 1: a", ["a"])["format_valid"] == 0.0
    rows = [{"kind": "useful", **report_lib.output_quality(five, ["Faezhalo"])},
            {"kind": "noisy", **report_lib.output_quality(five, ["zzz"])}]
    s = report_lib.summarize(rows)
    assert s["useful"]["contains_answer"] == 1.0 and s["noisy"]["contains_answer"] == 0.0


# ------------------------------------------------------------------------------------------------
# The pipeline command.
# ------------------------------------------------------------------------------------------------


def _pipeline(workdir, *flags, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "zerosearch_jax.simulator_sft",
         "--config=configs/simulator_sft.py", f"--workdir={workdir}", *flags],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_pipeline_config_errors_name_the_key(tmp_path):
    for flag, needle in [("--config.label.judge=magic", "config.label.judge must be one of"),
                         ("--config.collect.engine=google", "config.collect.engine"),
                         ("--config.collect.depth=3", "config.collect.depth = 3"),
                         ("--config.label.pairs=/nope.jsonl", "config.label.pairs")]:
        r = _pipeline(tmp_path / "w", flag)
        assert r.returncode == 2, r.stderr[-2000:]
        assert needle in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_pipeline_end_to_end_with_a_tiny_model(tmp_path, tiny):
    path = tiny[0]
    workdir = tmp_path / "sft"
    flags = [f"--config.simulator={path}", f"--config.collect.policy={path}",
             "--config.data.num_questions=24", "--config.collect.batch_size=12",
             "--config.collect.max_new_tokens=8", "--config.finetune.steps=3",
             "--config.finetune.batch_size=2", "--config.finetune.compute_dtype=float32",
             "--config.finetune.remat=False", "--config.report.num_queries=2",
             "--config.report.max_new_tokens=16", "--config.label.heldout_fraction=0.2"]
    r = _pipeline(workdir, *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("collect.jsonl", "sft_train.jsonl", "sft_heldout.jsonl", "report.md",
                 "report.png", "hf/config.json", "plots/training_curves.png"):
        assert (workdir / name).exists(), name
    report = json.loads((workdir / "report.json").read_text())
    assert set(report) == {"real engine (targets)", "tuned", "prompted base"}
    assert report["real engine (targets)"]["useful"]["format_valid"] == 1.0
    train = jsonl.read_jsonl(workdir / "sft_train.jsonl")
    assert {e["label"] for e in train} == {"useful", "noisy"}
    config, params = models.load_pretrained(str(workdir / "hf"), dtype=jnp.float32)
    assert config.num_layers == 2
    # A second run finds everything done and changes nothing it wrote.
    before = (workdir / "collect.jsonl").read_text()
    r = _pipeline(workdir, *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (workdir / "collect.jsonl").read_text() == before


@pytest.mark.parametrize("name", ["simulator_sft", "simulator_sft_paper"])
def test_simulator_sft_configs_validate(name):
    import importlib

    from zerosearch_jax.simulator_sft import pipeline

    sys.path.insert(0, REPO)
    config = importlib.import_module(f"configs.{name}").get_config()
    settings = pipeline.build_settings(config)
    if name.endswith("paper"):  # docs/method.md §8: lr 1e-6, batch 2, 1000 steps
        assert (settings.finetune.lr, settings.finetune.batch_size,
                settings.finetune.steps) == (1e-6, 2, 1000)
        assert settings.label.judge == "trajectory"


def test_collecting_by_the_question_alone_needs_no_policy(tmp_path):
    """`collect.query_sources="question"` (the default job's) searches each question as itself:
    no trajectory, so the policy is never loaded (a missing one is no error)."""
    from zerosearch_jax.simulator_sft import pipeline

    sys.path.insert(0, REPO)
    from configs import simulator_sft

    c = simulator_sft.get_config()
    c.collect.query_sources = "question"
    c.collect.policy = str(tmp_path / "no_such_model")
    c.data.num_questions = 6
    pairs = pipeline.collect(c, pipeline.build_settings(c), str(tmp_path), progress=False)
    records = jsonl.read_jsonl(tmp_path / "collect.jsonl")
    assert len(records) == 6 and len(pairs) == 6
    assert all([call["source"] for call in r["calls"]] == ["question"] for r in records)
    assert [p.query for p in pairs] == [r["question"] for r in records]


def test_boundary_weight_weighs_the_ends_of_documents_and_of_the_page(tiny):
    """`boundary_weight`: in every target, the four newlines between five `Doc k:` lines and
    the closing end-of-turn token, and nothing else; a cut target keeps its newlines but has
    no end-of-turn token to weigh."""
    _, _, _, tok = tiny
    examples = _examples(2)
    plain, _ = finetune_lib.encode(tok, examples, 256)
    weighted, _ = finetune_lib.encode(tok, examples, 256, boundary_weight=3.0)
    for i, e in enumerate(examples):
        ids = weighted["tokens"][i]
        changed = weighted["loss_mask"][i] != plain["loss_mask"][i]
        assert set(weighted["loss_mask"][i][changed].tolist()) == {3.0}
        assert e["target"].count("\n") == 4
        assert [tok.decode([t]) for t in ids[changed][:-1]] == ["\n"] * 4
        assert ids[changed][-1] == tok.eos_ids[0]
    both, _ = finetune_lib.encode(tok, examples, 256, answer_weight=5.0, boundary_weight=3.0)
    assert set(both["loss_mask"][0].tolist()) == {0.0, 1.0, 3.0, 5.0}  # the answer's, the ends'
    # Cut two tokens short of its end-of-turn token: the last newline is still weighed.
    prompt_len = int(plain["loss_mask"][0].argmax())
    n = int(plain["attention_mask"][0].sum())
    short, cut = finetune_lib.encode(tok, examples[:1], n - 2, boundary_weight=3.0)
    assert cut == 1 and (short["loss_mask"][0, prompt_len:] == 3.0).sum() == 4
    with pytest.raises(ValueError, match="boundary_weight"):
        finetune_lib.SFTConfig(boundary_weight=0.5)
