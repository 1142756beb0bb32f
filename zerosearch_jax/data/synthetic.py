"""A synthetic knowledge world: fictional entities, an encyclopedia corpus and questions over it.

Why: a pretrained model cannot answer questions about entities that do not exist, so on this world
reward can only come from searching. It gives a small, license-free, offline benchmark for the
whole loop (retriever -> policy -> reward) where a policy that learned to search is measurably
better than one that answers from memory, and where every answer is provably in the corpus.

What: from one seed (a numpy `Generator`), `build_world(WorldConfig(...))` makes countries,
cities, people, companies and inventions with syllable-generated names (unique, not real words),
attributes and relations:

    city -> country            country -> capital (one of its cities)
    person -> birthplace city (and its country), birth year, occupation
    company -> founder (a person), headquarters (a city), founding year, industry
    invention -> inventor (a person), year

Each entity has one passage in the Search-R1 corpus format `{"id": str, "contents":
"\"Title\"\ntext"}` (about 40-80 words). A passage states only the entity's own attributes and
the *names* of related entities, so:

- single-hop questions ("In which city was Zorvan Kelith born?") are answered by the passage of
  the entity named in the question;
- multi-hop questions ("In which country was the founder of Tralax Industries born?") need that
  passage for the bridge entity (the founder) and the bridge's passage for the answer; a
  multi-hop question is kept only if its answer is absent from the first passage.

Splits ("train", "validation", "test") are disjoint by subject entity: all questions about one
entity fall in one split, so test questions ask about entities never asked about in training.
`data_source` is "synthetic_single" or "synthetic_multi".
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from zerosearch_jax.data.qa import QAExample

SPLITS = ("train", "validation", "test")

# Name syllables: consonant-vowel syllables with an optional final consonant ("Zorvan",
# "Kelith"); onsets like "zh", "vr", "q" keep most names away from real words.
_ONSETS = ("b", "br", "d", "dr", "f", "g", "k", "kr", "l", "m", "n", "p", "r", "s", "t", "th",
           "tr", "v", "vr", "z", "zh", "q")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "ei", "y")
_CODAS = ("", "l", "n", "r", "s", "th", "x", "k")

_OCCUPATIONS = (  # (occupation, field)
    ("physicist", "physics"), ("painter", "painting"), ("architect", "architecture"),
    ("composer", "music"), ("engineer", "engineering"), ("novelist", "literature"),
    ("chemist", "chemistry"), ("botanist", "botany"), ("sculptor", "sculpture"),
    ("astronomer", "astronomy"), ("cartographer", "mapmaking"), ("physician", "medicine"),
)
_INDUSTRIES = ("shipbuilding", "textile", "glassmaking", "railway", "printing", "brewing",
               "mining", "clockmaking", "pharmaceutical", "telegraph")
_COMPANY_SUFFIXES = ("Industries", "Works", "Company", "Foundry", "Mills", "Trading House")
_DEVICES = (  # (device noun, what it is)
    ("loom", "weaving machine"), ("engine", "steam engine"), ("compass", "navigation instrument"),
    ("lantern", "signal lamp"), ("telescope", "reflecting telescope"), ("press", "printing press"),
    ("battery", "electrical cell"), ("valve", "pressure valve"), ("pump", "water pump"),
)
_TRAITS = ("patient", "restless", "meticulous", "generous", "stubborn", "curious", "reserved",
           "ambitious", "witty", "quiet")
_GEOGRAPHY = ("on the banks of a wide river", "in a sheltered bay", "at the foot of the hills",
              "on a high plateau", "beside a large lake", "on the edge of a forest")
_FEATURES = ("markets", "bridges", "libraries", "gardens", "harbour", "stone towers",
             "festivals", "universities", "canals", "workshops")
_EXPORTS = ("timber", "wool", "copper", "salt", "grain", "silver", "fish", "olive oil", "tin")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Size and seed of a synthetic world (defaults: ~650 passages, ~3k questions, < 1 s)."""

    seed: int = 0  # numpy Generator seed; the whole world is a function of this config.
    num_countries: int = 12
    num_cities: int = 60  # >= num_countries: every country gets at least one city (its capital).
    num_people: int = 360
    num_companies: int = 120
    num_inventions: int = 90
    validation_fraction: float = 0.1  # share of subject entities whose questions are validation
    test_fraction: float = 0.1  # share of subject entities whose questions are test

    def __post_init__(self):
        for field in ("num_countries", "num_cities", "num_people"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        for field in ("num_companies", "num_inventions"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        if self.num_cities < self.num_countries:
            raise ValueError(
                f"num_cities must be >= num_countries ({self.num_countries}), got {self.num_cities}"
            )
        fractions = (self.validation_fraction, self.test_fraction)
        if min(fractions) < 0 or sum(fractions) >= 1:
            raise ValueError(
                "validation_fraction and test_fraction must be >= 0 with a sum < 1, got "
                f"{self.validation_fraction} and {self.test_fraction}"
            )


# Entities refer to each other by index into the World's lists.
@dataclasses.dataclass(frozen=True)
class Country:
    name: str
    capital: int  # city index
    population_millions: float
    export: str


@dataclasses.dataclass(frozen=True)
class City:
    name: str
    country: int
    founded: int
    population: int


@dataclasses.dataclass(frozen=True)
class Person:
    name: str
    surname: str
    birth_year: int
    birthplace: int  # city index
    occupation: str
    field: str


@dataclasses.dataclass(frozen=True)
class Company:
    name: str
    industry: str
    founder: int  # person index
    headquarters: int  # city index
    founded: int


@dataclasses.dataclass(frozen=True)
class Invention:
    name: str  # e.g. "Morvel loom"
    device: str
    inventor: int  # person index
    year: int


@dataclasses.dataclass(frozen=True)
class _Question:
    example: QAExample
    subject: str  # passage id of the entity the question names; decides the split
    support: tuple[str, ...]  # passage ids in hop order; the answer is in the last one


class _Names:
    """Draws capitalized syllable words, never the same word twice in one world."""

    def __init__(self, rng: np.random.Generator):
        self._rng = rng
        self._used: set[str] = set()

    def word(self, syllables: int) -> str:
        while True:
            w = "".join(self._choice(_ONSETS) + self._choice(_VOWELS) for _ in range(syllables))
            w = (w + self._choice(_CODAS)).capitalize()
            # Length >= 5 keeps one name from being a short substring of many others.
            if len(w) >= 5 and w not in self._used:
                self._used.add(w)
                return w

    def _choice(self, options):
        return options[self._rng.integers(len(options))]


def _pick(rng: np.random.Generator, options):
    return options[rng.integers(len(options))]


@dataclasses.dataclass(frozen=True)
class World:
    """A generated world. Build with `build_world`.

    Attributes:
      config: the config it was built from.
      countries, cities, people, companies, inventions: entities (indices are references).
      passages: one `{"id": str, "contents": "\"Title\"\ntext"}` dict per entity.
    """

    config: WorldConfig
    # The rest is large, so it is left out of the repr.
    countries: tuple[Country, ...] = dataclasses.field(repr=False)
    cities: tuple[City, ...] = dataclasses.field(repr=False)
    people: tuple[Person, ...] = dataclasses.field(repr=False)
    companies: tuple[Company, ...] = dataclasses.field(repr=False)
    inventions: tuple[Invention, ...] = dataclasses.field(repr=False)
    passages: list[dict[str, str]] = dataclasses.field(repr=False)
    _questions: dict[str, tuple[_Question, ...]] = dataclasses.field(repr=False)

    def questions(self, split: str) -> list[QAExample]:
        """The questions of `split` ("train", "validation" or "test"), in a fixed order."""
        if split not in self._questions:
            raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")
        return [q.example for q in self._questions[split]]

    def supporting_passages(self, question_id: str) -> tuple[dict[str, str], ...]:
        """The passages that answer a question, in hop order (1 for single-hop, 2 for multi)."""
        try:
            support = self._support[question_id]
        except KeyError:
            raise KeyError(f"no question with id {question_id!r}") from None
        return tuple(self.passages[int(pid)] for pid in support)

    @functools.cached_property
    def _support(self) -> dict[str, tuple[str, ...]]:
        return {q.example.id: q.support for qs in self._questions.values() for q in qs}

    def write_corpus_jsonl(self, path: str | Path) -> None:
        """Write the passages as a Search-R1 corpus (one `{"id", "contents"}` object a line)."""
        _write_jsonl(path, self.passages)

    def write_questions_jsonl(self, path: str | Path, split: str) -> None:
        """Write a split in the FlashRAG format read by `qa.load_jsonl`."""
        _write_jsonl(
            path,
            (
                {"id": q.id, "question": q.question, "golden_answers": list(q.golden_answers),
                 "data_source": q.data_source}
                | ({"bridge_answers": list(q.bridge_answers)} if q.bridge_answers else {})
                for q in self.questions(split)
            ),
        )


def _write_jsonl(path: str | Path, rows) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# Entities
# ---------------------------------------------------------------------------------------------


def _make_entities(config: WorldConfig, rng: np.random.Generator, names: _Names):
    countries_raw = [names.word(3) for _ in range(config.num_countries)]
    # The first num_countries cities are the capitals, one per country.
    city_country = list(range(config.num_countries)) + [
        int(rng.integers(config.num_countries))
        for _ in range(config.num_cities - config.num_countries)
    ]
    cities = tuple(
        City(
            name=names.word(int(rng.integers(2, 4))),
            country=country,
            founded=int(rng.integers(700, 1700)),
            population=int(rng.integers(5, 2000)) * 1000,
        )
        for country in city_country
    )
    countries = tuple(
        Country(
            name=name,
            capital=i,
            population_millions=round(float(rng.uniform(0.5, 60.0)), 1),
            export=_pick(rng, _EXPORTS),
        )
        for i, name in enumerate(countries_raw)
    )
    people = []
    for _ in range(config.num_people):
        first, surname = names.word(2), names.word(int(rng.integers(2, 4)))
        occupation, field = _pick(rng, _OCCUPATIONS)
        people.append(
            Person(
                name=f"{first} {surname}",
                surname=surname,
                birth_year=int(rng.integers(1700, 1950)),
                birthplace=int(rng.integers(config.num_cities)),
                occupation=occupation,
                field=field,
            )
        )
    companies = []
    for _ in range(config.num_companies):
        founder = int(rng.integers(config.num_people))
        companies.append(
            Company(
                name=f"{names.word(2)} {_pick(rng, _COMPANY_SUFFIXES)}",
                industry=_pick(rng, _INDUSTRIES),
                founder=founder,
                headquarters=int(rng.integers(config.num_cities)),
                founded=people[founder].birth_year + int(rng.integers(22, 56)),
            )
        )
    inventions = []
    for _ in range(config.num_inventions):
        inventor = int(rng.integers(config.num_people))
        device, _description = _pick(rng, _DEVICES)
        inventions.append(
            Invention(
                name=f"{names.word(2)} {device}",
                device=device,
                inventor=inventor,
                year=people[inventor].birth_year + int(rng.integers(20, 61)),
            )
        )
    return countries, cities, tuple(people), tuple(companies), tuple(inventions)


# ---------------------------------------------------------------------------------------------
# Passages: each states only the entity's own attributes and the names of related entities.
# ---------------------------------------------------------------------------------------------


def _country_text(w: World, i: int, rng: np.random.Generator) -> str:
    c = w.countries[i]
    capital = w.cities[c.capital].name
    others = [city.name for j, city in enumerate(w.cities) if city.country == i and j != c.capital]
    others = others[:2]
    other_text = (
        f" Other cities in {c.name} include {' and '.join(others)}." if others else ""
    )
    return (
        f"{c.name} is a country whose capital and largest city is {capital}. It has a "
        f"population of about {c.population_millions} million people.{other_text} The economy of "
        f"{c.name} has long depended on {c.export}, which it trades with its neighbours, and the "
        f"country is known for its {_pick(rng, _FEATURES)} and {_pick(rng, _FEATURES)}. Its "
        f"people are often described by travellers as {_pick(rng, _TRAITS)} and welcoming."
    )


def _city_text(w: World, i: int, rng: np.random.Generator) -> str:
    c = w.cities[i]
    country = w.countries[c.country]
    role = f"the capital of {country.name}" if country.capital == i else f"a city in {country.name}"
    return (
        f"{c.name} is {role}. Founded in {c.founded}, it lies {_pick(rng, _GEOGRAPHY)} and has a "
        f"population of about {c.population:,} people. {c.name} is known for its "
        f"{_pick(rng, _FEATURES)} and its {_pick(rng, _FEATURES)}, and for centuries its "
        f"merchants traded {_pick(rng, _EXPORTS)} along the roads that meet there. Visitors "
        f"describe the old quarter as {_pick(rng, _TRAITS)} in winter and crowded in summer."
    )


def _person_text(w: World, i: int, rng: np.random.Generator) -> str:
    p = w.people[i]
    city = w.cities[p.birthplace]
    country = w.countries[city.country]
    deeds = [f"In {co.founded}, {p.surname} founded {co.name}." for co in w.companies
             if co.founder == i][:2]
    deeds += [f"{p.surname} invented the {inv.name} in {inv.year}." for inv in w.inventions
              if inv.inventor == i][:2]
    return " ".join(
        [
            f"{p.name} was a {p.occupation} born in {p.birth_year} in the city of {city.name}, "
            f"{country.name}.",
            f"{p.surname} studied {p.field} from an early age and became known for careful work "
            f"that influenced a generation of students.",
            *deeds,
            f"Contemporaries described {p.surname} as {_pick(rng, _TRAITS)} and "
            f"{_pick(rng, _TRAITS)}, and several letters by {p.surname} survive in private "
            "collections.",
        ]
    )


def _company_text(w: World, i: int, rng: np.random.Generator) -> str:
    c = w.companies[i]
    founder = w.people[c.founder]
    hq = w.cities[c.headquarters]
    return (
        f"{c.name} is a {c.industry} company founded in {c.founded} by {founder.name}. It is "
        f"headquartered in {hq.name}. The company grew from a small workshop into one of the "
        f"best known {c.industry} firms of its region, and its {_pick(rng, _TRAITS)} early "
        f"management is still discussed by historians. {c.name} remains an important employer "
        f"in {hq.name}."
    )


def _invention_text(w: World, i: int, rng: np.random.Generator) -> str:
    inv = w.inventions[i]
    inventor = w.people[inv.inventor]
    description = dict(_DEVICES)[inv.device]
    return (
        f"The {inv.name} is a {description} invented by {inventor.name} in {inv.year}. It was "
        f"praised for its {_pick(rng, _TRAITS)} simplicity and was soon copied by workshops in "
        f"many countries. Early examples of the {inv.name} are kept in museums, and its design "
        f"influenced later machines for several decades after {inventor.surname} first "
        "demonstrated it."
    )


def _passage(passage_id: str, title: str, text: str) -> dict[str, str]:
    return {"id": passage_id, "contents": f'"{title}"\n{text}'}


# ---------------------------------------------------------------------------------------------
# Questions
# ---------------------------------------------------------------------------------------------


# add(subject, key, question, answers, support=()): records one question.
_Add = Callable[..., None]


def _make_questions(w: World, pid: Callable[[str, int], str]) -> list[_Question]:
    """All questions; `pid(kind, index)` gives an entity's passage id."""
    text = {p["id"]: p["contents"] for p in w.passages}
    questions: list[_Question] = []

    def add(subject: str, key: str, question: str, answers, support=()) -> None:
        support = (subject, *support)
        answers = tuple(dict.fromkeys(str(a) for a in answers))  # unique, ordered
        multi = len(support) > 1
        # A multi-hop answer must need the second passage.
        if multi and any(a.lower() in text[subject].lower() for a in answers):
            return
        bridge = ()
        if multi:
            # The bridge entity's passage title (a person's full name, a city, a country), and
            # a person's surname alone, as `_person_answers` accepts it.
            title = text[support[1]].split("\n", 1)[0].strip('"')
            bridge = tuple(dict.fromkeys((title, title.split()[-1])))
        questions.append(
            _Question(
                example=QAExample(
                    id=f"{subject}-{key}",
                    question=question,
                    golden_answers=answers,
                    data_source="synthetic_multi" if multi else "synthetic_single",
                    bridge_answers=bridge,
                ),
                subject=subject,
                support=support,
            )
        )

    for kind_questions in (_place_questions, _person_questions, _company_questions,
                           _invention_questions):
        kind_questions(w, pid, add)
    return questions


def _person_answers(p: Person) -> tuple[str, str]:
    return (p.name, p.surname)


def _place_questions(w: World, pid: Callable[[str, int], str], add: _Add) -> None:
    """The questions about countries and cities, each given to `add` (see `_make_questions`)."""
    for i, c in enumerate(w.countries):
        capital = w.cities[c.capital]
        add(pid("country", i), "capital", f"What is the capital of {c.name}?", [capital.name])
        add(pid("country", i), "capital_founded",
            f"In what year was the capital of {c.name} founded?", [capital.founded],
            [pid("city", c.capital)])
    for i, c in enumerate(w.cities):
        country = w.countries[c.country]
        add(pid("city", i), "country", f"In which country is {c.name} located?", [country.name])
        add(pid("city", i), "founded", f"In what year was {c.name} founded?", [c.founded])
        if country.capital != i:
            add(pid("city", i), "country_capital",
                f"What is the capital of the country where {c.name} is located?",
                [w.cities[country.capital].name], [pid("country", c.country)])


def _person_questions(w: World, pid: Callable[[str, int], str], add: _Add) -> None:
    """The questions about people, each given to `add` (see `_make_questions`)."""
    for i, p in enumerate(w.people):
        city = w.cities[p.birthplace]
        add(pid("person", i), "birth_city", f"In which city was {p.name} born?", [city.name])
        add(pid("person", i), "birth_country", f"In which country was {p.name} born?",
            [w.countries[city.country].name])
        add(pid("person", i), "birth_year", f"In what year was {p.name} born?", [p.birth_year])
        add(pid("person", i), "occupation", f"What was the occupation of {p.name}?",
            [p.occupation])
        add(pid("person", i), "birth_city_founded",
            f"In what year was the city where {p.name} was born founded?", [city.founded],
            [pid("city", p.birthplace)])


def _company_questions(w: World, pid: Callable[[str, int], str], add: _Add) -> None:
    """The questions about companies, each given to `add` (see `_make_questions`)."""
    for i, co in enumerate(w.companies):
        founder = w.people[co.founder]
        hq = w.cities[co.headquarters]
        add(pid("company", i), "founder", f"Who founded {co.name}?", _person_answers(founder))
        add(pid("company", i), "headquarters", f"In which city is {co.name} headquartered?",
            [hq.name])
        add(pid("company", i), "founded", f"In what year was {co.name} founded?", [co.founded])
        founder_support = [pid("person", co.founder)]
        add(pid("company", i), "founder_birth_country",
            f"In which country was the founder of {co.name} born?",
            [w.countries[w.cities[founder.birthplace].country].name], founder_support)
        add(pid("company", i), "founder_birth_year",
            f"In what year was the founder of {co.name} born?", [founder.birth_year],
            founder_support)
        add(pid("company", i), "founder_occupation",
            f"What was the occupation of the founder of {co.name}?", [founder.occupation],
            founder_support)
        add(pid("company", i), "headquarters_country",
            f"In which country is the headquarters of {co.name}?",
            [w.countries[hq.country].name], [pid("city", co.headquarters)])


def _invention_questions(w: World, pid: Callable[[str, int], str], add: _Add) -> None:
    """The questions about inventions, each given to `add` (see `_make_questions`)."""
    for i, inv in enumerate(w.inventions):
        inventor = w.people[inv.inventor]
        add(pid("invention", i), "inventor", f"Who invented the {inv.name}?",
            _person_answers(inventor))
        add(pid("invention", i), "year", f"In what year was the {inv.name} invented?", [inv.year])
        add(pid("invention", i), "inventor_birth_city",
            f"In which city was the inventor of the {inv.name} born?",
            [w.cities[inventor.birthplace].name], [pid("person", inv.inventor)])
        add(pid("invention", i), "inventor_occupation",
            f"What was the occupation of the inventor of the {inv.name}?",
            [inventor.occupation], [pid("person", inv.inventor)])


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------


def build_world(config: WorldConfig = WorldConfig()) -> World:
    """Generate the world of `config` deterministically (same config -> identical world)."""
    rng = np.random.default_rng(config.seed)
    countries, cities, people, companies, inventions = _make_entities(config, rng, _Names(rng))
    world = World(config, countries, cities, people, companies, inventions, passages=[],
                  _questions={})

    # Passage ids are consecutive strings in this order: countries, cities, people, companies,
    # inventions (the Search-R1 wiki corpus also uses stringified row numbers).
    kinds = (
        ("country", countries, _country_text),
        ("city", cities, _city_text),
        ("person", people, _person_text),
        ("company", companies, _company_text),
        ("invention", inventions, _invention_text),
    )
    offsets, offset = {}, 0
    for kind, entities, _ in kinds:
        offsets[kind] = offset
        offset += len(entities)

    def pid(kind: str, index: int) -> str:
        return str(offsets[kind] + index)

    passages = [
        _passage(pid(kind, i), entity.name, render(world, i, rng))
        for kind, entities, render in kinds
        for i, entity in enumerate(entities)
    ]
    world = dataclasses.replace(world, passages=passages)

    # Split by subject entity: a random permutation of passage ids, cut by the fractions.
    order = rng.permutation(len(world.passages))
    n_val = round(config.validation_fraction * len(order))
    n_test = round(config.test_fraction * len(order))
    split_of = {}
    for rank, index in enumerate(order):
        split_of[str(index)] = (
            "validation" if rank < n_val else "test" if rank < n_val + n_test else "train"
        )
    by_split: dict[str, list[_Question]] = {split: [] for split in SPLITS}
    for question in _make_questions(world, pid):
        by_split[split_of[question.subject]].append(question)
    return dataclasses.replace(
        world, _questions={split: tuple(qs) for split, qs in by_split.items()}
    )
