"""The policy's format warm-up (agent.warmup): demonstrations, their token layout, the stage."""

import json
import os

import numpy as np
import pytest

from zerosearch_jax import agent, rewards, search
from zerosearch_jax.agent import warmup
from zerosearch_jax.data import synthetic
from zerosearch_jax.data.qa import QAExample
from zerosearch_jax.search.base import SearchEngine, SearchResult

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world():
    return synthetic.build_world(synthetic.WorldConfig(seed=0))


@pytest.fixture(scope="module")
def world_engine(world):
    return search.BM25SearchEngine.build(
        [search.Passage.from_contents(p["id"], p["contents"]) for p in world.passages], topk=3)


def test_demonstrations_search_each_hop_and_keep_grounded_answers(world, world_engine):
    questions = world.questions("train")[:40]
    demos, counts = warmup.build_demonstrations(
        questions, world_engine, max_turns=2, plan=warmup.synthetic_world_queries(world))
    assert counts["examples"] == 40 and counts["kept"] == len(demos) > 20
    assert counts["kept"] + counts["no_answer_in_docs"] + counts["failed_searches"] == 40
    hops = {d.example.data_source: len(d.queries) for d in demos}
    assert hops == {"synthetic_single": 1, "synthetic_multi": 2}
    for d in demos:
        assert d.queries[0] == d.example.question
        assert rewards.cover_exact_match(" ".join(d.documents), d.example.golden_answers)
        assert d.answer == d.example.golden_answers[0]
    # A two-hop question's second query is the bridge entity: "Soqezhar" for the capital of
    # Qaesaryn (2-capital_founded, whose answer 1534 is in Soqezhar's passage).
    two_hop = [d for d in demos if d.example.id == "2-capital_founded"]
    if two_hop:
        assert two_hop[0].queries == ("In what year was the capital of Qaesaryn founded?",
                                      "Soqezhar")


def test_only_the_visible_documents_count(world, world_engine, smollm2_tokenizer):
    """An answer cut off by the observation cap is not in what the policy sees: such an
    episode is dropped."""
    q = world.questions("train")[:24]
    plan = warmup.synthetic_world_queries(world)
    full, _ = warmup.build_demonstrations(q, world_engine, max_turns=2, plan=plan)
    tiny, counts = warmup.build_demonstrations(
        q, world_engine, max_turns=2, plan=plan,
        visible=warmup.visible_documents(smollm2_tokenizer, 24))
    assert len(tiny) < len(full) and counts["no_answer_in_docs"] > 0
    see = warmup.visible_documents(smollm2_tokenizer, 24)
    for d in tiny:
        assert rewards.cover_exact_match(" ".join(map(see, d.documents)),
                                         d.example.golden_answers)


def test_max_turns_caps_the_plan(world, world_engine):
    q = [e for e in world.questions("train") if e.data_source == "synthetic_multi"][:5]
    demos, _ = warmup.build_demonstrations(q, world_engine, max_turns=1,
                                           plan=warmup.synthetic_world_queries(world))
    assert all(len(d.queries) == 1 for d in demos)
    with pytest.raises(ValueError, match="max_turns >= 1"):
        warmup.build_demonstrations(q, world_engine, max_turns=0)


def test_rereading_single_hop_searches_the_answer_page_again(world, world_engine):
    """`reread_single_hop` adds a second search to that fraction of single-hop plans: the
    title of the one supporting passage, whose page BM25 returns first. The choice is fixed
    per question; two-hop plans are unchanged."""
    q = world.questions("train")[:200]
    plain, half = warmup.synthetic_world_queries(world), warmup.synthetic_world_queries(world,
                                                                                         0.5)
    single = [e for e in q if e.data_source == "synthetic_single"]
    reread = [e for e in single if len(half(e)) == 2]
    assert 0.3 < len(reread) / len(single) < 0.7
    assert half(reread[0]) == half(reread[0])  # the same choice on every call
    assert all(len(plain(e)) == 1 for e in single)
    assert all(half(e) == plain(e) for e in q if e.data_source == "synthetic_multi")
    assert all(len(warmup.synthetic_world_queries(world, 1.0)(e)) == 2 for e in single)
    for e in reread[:5]:
        title = world.supporting_passages(e.id)[0]["contents"].split("\n", 1)[0].strip('"')
        assert half(e) == [e.question, title]
        assert e.golden_answers[0] in world_engine.search([title])[0].text.split("Doc 2")[0]
    with pytest.raises(ValueError, match="reread_single_hop"):
        warmup.synthetic_world_queries(world, 1.5)


class _FailingEngine(SearchEngine):
    name = "failing"

    def _search(self, queries, contexts):
        return [SearchResult.failure("down") for _ in queries]


def test_failed_searches_are_counted_not_demonstrated():
    q = [QAExample(id="a", question="Who?", golden_answers=("x",), data_source="t")]
    demos, counts = warmup.build_demonstrations(q, _FailingEngine(), max_turns=2)
    assert demos == [] and counts["failed_searches"] == 1


def test_encoding_masks_exactly_the_policy_turns(world, world_engine, smollm2_tokenizer):
    tok = smollm2_tokenizer
    questions = [e for e in world.questions("train") if e.data_source == "synthetic_multi"][:6]
    demos, _ = warmup.build_demonstrations(questions, world_engine, max_turns=2,
                                           plan=warmup.synthetic_world_queries(world))
    rc = agent.RolloutConfig(max_turns=2, max_new_tokens=64, max_obs_tokens=96)
    data = warmup.encode_demonstrations(tok, demos, rc)
    N, T = data["tokens"].shape
    assert N == len(demos) and set(data) == {"tokens", "attention_mask", "positions",
                                             "loss_mask"}
    for i, d in enumerate(demos):
        tokens, mask = data["tokens"][i], data["loss_mask"][i]
        attn = data["attention_mask"][i]
        # The masked tokens are the policy's turns, in order, and nothing else.
        policy_text = tok.decode(tokens[mask == 1], skip_special_tokens=False)
        turns = [t for t, is_policy in d.turns() if is_policy]
        assert policy_text == "".join(turns)
        assert policy_text.endswith(f"<answer> {d.answer} </answer>")
        # Everything real but unmasked is the prompt or an inserted information block.
        inserted = tok.decode(tokens[(mask == 0) & attn], skip_special_tokens=False)
        assert d.example.question in inserted and inserted.count("\n\n<information>") == 2
        assert "<answer>" not in inserted.split("Question:")[-1]
        # Positions count real tokens only (left-padded prompt), as in a rollout batch.
        np.testing.assert_array_equal(data["positions"][i][attn], np.arange(attn.sum()))


def test_warm_up_stage_runs_once_and_rl_starts_from_it(tmp_path, smollm2_tokenizer):
    """A tiny end-to-end run with the stage on: the warmed-up policy is exported, its loss
    curve written, RL starts from it, and a second run reuses the stage instead of redoing it."""
    import subprocess
    import sys

    from tests.train_utils import tiny_policy_dir, tiny_run_flags

    policy = tiny_policy_dir(tmp_path, smollm2_tokenizer)
    work = tmp_path / "run"
    flags = tiny_run_flags(policy, work, steps=1, **{
        "warmup.steps": 3, "warmup.num_questions": 8, "warmup.batch_size": 2,
        "warmup.lr": 1e-2, "rollout.max_turns": 2})
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "zerosearch_jax.train", *flags], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage = work / "warmup"
    counts = json.load(open(stage / "demonstrations.json"))
    assert counts["examples"] == 8 and counts["kept"] >= 1
    losses = [json.loads(line)["train/loss"] for line in open(stage / "metrics.jsonl")]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (stage / "hf" / "config.json").exists()
    before = json.load(open(stage / "validation_before.json"))  # the untrained policy
    assert {"f1", "em", "cover_em", "searches"} <= set(before)
    assert "format warm-up" in proc.stderr
    # Exported, so its checkpoints are gone (a re-run reads hf/).
    assert not (stage / "checkpoints").exists()
    assert "removed the finished stage's checkpoints" in proc.stderr
    mtime = os.path.getmtime(stage / "demonstrations.json")
    # A longer run in the same workdir resumes RL and reuses the warmed-up policy.
    flags = tiny_run_flags(policy, work, steps=2, **{
        "warmup.steps": 3, "warmup.num_questions": 8, "warmup.batch_size": 2,
        "warmup.lr": 1e-2, "rollout.max_turns": 2})
    proc = subprocess.run([sys.executable, "-m", "zerosearch_jax.train", *flags], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "using the warmed-up policy" in proc.stderr
    assert os.path.getmtime(stage / "demonstrations.json") == mtime
    # Another run reads that stage through stages_dir (a sweep's points): nothing is written
    # in the shared directory, nothing of the stage in its own, and with before_rl=False there
    # is no step-0 validation. A stages_dir without the stage is refused, naming the key.
    other = tmp_path / "other"
    flags = tiny_run_flags(policy, other, steps=1, **{
        "warmup.steps": 3, "rollout.max_turns": 2, "stages_dir": str(work),
        "validation.before_rl": False})
    proc = subprocess.run([sys.executable, "-m", "zerosearch_jax.train", *flags], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"using the warmed-up policy in {stage / 'hf'}" in proc.stderr
    assert not (other / "warmup").exists()
    assert os.path.getmtime(stage / "demonstrations.json") == mtime
    steps = [json.loads(line)["step"] for line in open(other / "metrics.jsonl")]
    assert steps == [1]
    flags = tiny_run_flags(policy, tmp_path / "third", steps=1, **{
        "warmup.steps": 3, "stages_dir": str(tmp_path / "empty")})
    proc = subprocess.run([sys.executable, "-m", "zerosearch_jax.train", *flags], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "config.stages_dir" in proc.stderr, proc.stderr[-2000:]


def test_a_finished_stage_drops_its_checkpoints_only_once_exported(tmp_path,
                                                                    smollm2_tokenizer):
    from configs import default
    from tests.train_utils import tiny_policy_dir
    from zerosearch_jax import stages

    export = tiny_policy_dir(tmp_path, smollm2_tokenizer)  # a complete hf/ export
    c = default.get_config()

    def stage_with_checkpoints(name):
        (tmp_path / name / "checkpoints" / "3").mkdir(parents=True)
        (tmp_path / name / "checkpoints" / "3" / "x").write_bytes(b"0" * 4096)
        return str(tmp_path / name)

    stages.finished(c, stage_with_checkpoints("unexported"), str(tmp_path / "no_export"))
    assert (tmp_path / "unexported" / "checkpoints" / "3" / "x").exists()
    stages.finished(c, stage_with_checkpoints("done"), str(export))
    assert not (tmp_path / "done" / "checkpoints").exists()
    c.checkpoint.keep_stage_checkpoints = True
    stages.finished(c, stage_with_checkpoints("kept"), str(export))
    assert (tmp_path / "kept" / "checkpoints" / "3" / "x").exists()


def test_stratified_demonstrations_show_the_second_search_as_often_as_one(world_engine,
                                                                           smollm2_tokenizer):
    """`warmup.stratify` draws the demonstrated questions evenly from single- and two-hop (the
    training split is one third two-hop), so half the kept episodes search twice."""
    from configs import default
    from zerosearch_jax import stages
    from zerosearch_jax.train import build_settings

    c = default.get_config()
    c.warmup.num_questions = 24
    rollout = build_settings(c).rollout
    kept = {}
    for stratify in (False, True):
        c.warmup.stratify = stratify
        data, counts = stages.demonstrations(c, rollout, smollm2_tokenizer, world_engine)
        assert counts["examples"] == 24 and len(data["tokens"]) == counts["kept"]
        kept[stratify] = counts["kept_multi_search"] / counts["kept"]
    assert kept[True] >= 0.4 and kept[True] > kept[False] + 0.1, kept
