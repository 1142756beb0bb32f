"""Tests for zerosearch_jax.data.synthetic (the synthetic knowledge world)."""

import collections
import json
import time

import pytest

from zerosearch_jax.data.qa import load_jsonl
from zerosearch_jax.data.synthetic import SPLITS, WorldConfig, build_world
from zerosearch_jax.rewards import normalize_answer

SMALL = WorldConfig(
    seed=3, num_countries=4, num_cities=12, num_people=40, num_companies=15, num_inventions=10
)


@pytest.fixture(scope="module")
def world():
    return build_world()


def _all_questions(w):
    return [q for split in SPLITS for q in w.questions(split)]


def _title_and_text(passage):
    title, text = passage["contents"].split("\n", 1)
    return title.strip('"'), text


def test_deterministic_from_seed():
    a, b = build_world(SMALL), build_world(SMALL)
    assert a.passages == b.passages
    for split in SPLITS:
        assert a.questions(split) == b.questions(split)


def test_different_seeds_differ():
    a, b = build_world(SMALL), build_world(WorldConfig(**{**SMALL.__dict__, "seed": 4}))
    assert {p["contents"] for p in a.passages}.isdisjoint({p["contents"] for p in b.passages})
    assert a.questions("train") != b.questions("train")


def test_default_size_and_speed():
    start = time.perf_counter()
    w = build_world()
    assert time.perf_counter() - start < 1.0
    assert 300 <= len(w.passages) <= 1000
    assert 2000 <= len(_all_questions(w)) <= 6000
    sources = collections.Counter(q.data_source for q in _all_questions(w))
    assert set(sources) == {"synthetic_single", "synthetic_multi"}
    assert sources["synthetic_multi"] > 500


def test_passage_format(world):
    ids = [p["id"] for p in world.passages]
    assert ids == [str(i) for i in range(len(ids))]
    for passage in world.passages:
        assert set(passage) == {"id", "contents"}
        title, text = _title_and_text(passage)
        assert passage["contents"].startswith(f'"{title}"\n')
        assert 40 <= len(text.split()) <= 85, passage


def test_names_unique(world):
    titles = [_title_and_text(p)[0] for p in world.passages]
    assert len(titles) == len(set(titles))
    # No person shares a surname with another entity name either (surnames are answer aliases).
    surnames = [p.surname for p in world.people]
    assert len(surnames) == len(set(surnames))
    assert not set(surnames) & set(titles)


def test_splits_disjoint_and_cover_everything(world):
    by_split = {split: world.questions(split) for split in SPLITS}
    ids = {split: {q.id for q in qs} for split, qs in by_split.items()}
    texts = {split: {q.question for q in qs} for split, qs in by_split.items()}
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not ids[a] & ids[b]
                assert not texts[a] & texts[b]
    # Disjoint by subject entity too: the passage named by the question id prefix.
    subjects = {split: {q.id.split("-")[0] for q in qs} for split, qs in by_split.items()}
    assert not subjects["train"] & subjects["test"]
    assert not subjects["train"] & subjects["validation"]
    assert 0.05 < len(by_split["test"]) / len(_all_questions(world)) < 0.2
    all_ids = [q.id for q in _all_questions(world)]
    assert len(all_ids) == len(set(all_ids))
    with pytest.raises(ValueError, match="'dev'"):
        world.questions("dev")


def _contains(text, answer):
    return normalize_answer(answer) in normalize_answer(text)


def test_answers_derivable_from_passages(world):
    for q in _all_questions(world):
        support = world.supporting_passages(q.id)
        first_title, first_text = _title_and_text(support[0])
        assert first_title in q.question, q  # the question names the first passage's entity
        assert q.question.endswith("?") and q.golden_answers
        if q.data_source == "synthetic_single":
            assert len(support) == 1
            assert all(_contains(first_text, a) for a in q.golden_answers), q
        else:
            assert len(support) == 2
            bridge_title, bridge_text = _title_and_text(support[1])
            assert bridge_title in first_text, q  # hop 1 names the bridge entity
            assert all(_contains(bridge_text, a) for a in q.golden_answers), q  # hop 2 answers
            assert not any(_contains(first_text, a) for a in q.golden_answers), q


def test_multi_hop_chains_are_consistent(world):
    """Spot-check one chain against the entity tables (not only against the rendered text)."""
    questions = {q.question: q for q in _all_questions(world)}
    checked = 0
    for company in world.companies:
        founder = world.people[company.founder]
        country = world.countries[world.cities[founder.birthplace].country]
        assert questions[f"Who founded {company.name}?"].golden_answers == (
            founder.name,
            founder.surname,
        )
        q = questions.get(f"In which country was the founder of {company.name} born?")
        if q is not None:  # dropped when the company passage already names the country
            assert q.golden_answers == (country.name,)
            checked += 1
    assert checked > len(world.companies) // 2


def test_write_jsonl_roundtrip(tmp_path):
    w = build_world(SMALL)
    w.write_corpus_jsonl(tmp_path / "corpus.jsonl")
    lines = (tmp_path / "corpus.jsonl").read_text("utf-8").splitlines()
    assert [json.loads(line) for line in lines] == w.passages
    w.write_questions_jsonl(tmp_path / "test.jsonl", "test")
    # The multi-hop questions' bridge answers (`simulator.hop_answers`) travel too.
    assert load_jsonl(tmp_path / "test.jsonl") == w.questions("test")
    assert any(q.bridge_answers for q in w.questions("test"))


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        (dict(num_cities=2, num_countries=3), "num_cities"),
        (dict(num_people=0), "num_people"),
        (dict(num_companies=-1), "num_companies"),
        (dict(validation_fraction=0.6, test_fraction=0.5), "0.6"),
    ],
)
def test_bad_config_raises(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        WorldConfig(**kwargs)
