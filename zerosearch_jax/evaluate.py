"""Evaluation harness: the search agent and the paper's baselines on the FlashRAG QA sets.

    python -m zerosearch_jax.evaluate --config=configs/evaluate.py --workdir=runs/eval \\
        [--config.model=runs/default/hf_policy] [--config.engine=bm25] \\
        [--config.datasets=nq,hotpotqa,bamboogle] [--config.sample_size=500]

Methods (docs/method.md §9), all greedy and batched:
- `direct`: the question, answered at once;
- `cot`: think step by step, then answer;
- `rag`: retrieve top-k once for the question with the engine, answer from the documents;
- `agent`: the ZeroSearch / Search-R1 multi-turn loop (`agent.rollout`, any checkpoint, any
  engine). The baselines ask for the answer inside `<answer>..</answer>` too, so one extractor
  (`rewards.score_response`) scores every method. F1 here is FlashRAG's
  (`rewards.flashrag_f1_score`: no partial credit between different yes / no answers), so the
  tables compare with FlashRAG-style evaluations; the training reward is upstream's plain F1.

Outputs in the work directory:
- `traces.jsonl`: one line per (method, dataset, question): ids, question, gold answers, prompt,
  response and its turns, the search calls with their documents, answer, `em`, `cover_em`, `f1`,
  `searches`. Appended (flush + fsync) after every batch, so a killed run resumes where it
  stopped: questions already in the file are skipped, a truncated last line is dropped.
- `results.md` (tables like the paper's: rows methods, columns datasets + Avg) and
  `results.csv`, both computed from `traces.jsonl` only, so a resumed run writes the same tables
  as an uninterrupted one. Batches are fixed chunks of each dataset's sample (a partly written
  batch is re-run whole), so a resumed question sees exactly the batch shapes it would have.
- `eval_config.json`: the settings that change per-question results; resuming with different
  ones is refused. `throughput.json`: questions/s per method, also printed at the end.
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import io
import json
import logging
import os
import re
import time
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from zerosearch_jax import agent, inputs, models, rewards, sampling, search
from zerosearch_jax.cli import run_command
from zerosearch_jax.data import qa
from zerosearch_jax.data.sources import load_qa
from zerosearch_jax.inputs import ConfigError
from zerosearch_jax.settings import build, check
from zerosearch_jax.tokenizer import Tokenizer

logger = logging.getLogger("zerosearch_jax.evaluate")

METHODS = ("direct", "cot", "rag", "agent")
METHOD_TITLES = {"direct": "Direct answer", "cot": "Chain of thought", "rag": "RAG",
                 "agent": "Search agent"}
ENGINES = ("bm25", "searchr1", "zerosearch_wiki", "serpapi", "simulator", "simulator_server")
FLASHRAG_HUB = "RUC-NLPIR/FlashRAG_datasets"
FLASHRAG_DATASETS = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique",
                     "bamboogle")
# Local files a bare dataset name resolves to, in order: FlashRAG jsonl (test, else dev), then
# the upstream ZeroSearch / Search-R1 parquet.
_LOCAL_FORMS = ("{}_test.jsonl", "{}_dev.jsonl", "{}_search_test.parquet", "{}_test.parquet",
                "{}_dev.parquet")
# Reported metrics, in table order; cover_em is the paper's "EM" (upstream subem_check).
METRICS = ("cover_em", "em", "f1", "searches")
METRIC_TITLES = {"cover_em": 'cover EM (the paper\'s "EM"), %', "em": "EM (strict), %",
                 "f1": "F1, %", "searches": "searches per question"}
TRACE_KEYS = ("method", "dataset", "id")
TRACES_FILE, RESULTS_MD, RESULTS_CSV = "traces.jsonl", "results.md", "results.csv"
RUN_CONFIG_FILE, THROUGHPUT_FILE, LOCK_FILE = "eval_config.json", "throughput.json", ".lock"

# The baselines ask for the answer in the agent's tags, so one extractor scores every method. No
# example answer is given: small models copy it ("Beijing") instead of answering.
_ANSWER_FORMAT = ("Write the answer, as short as possible (a name, a date, a number or a few "
                  "words), inside <answer> and </answer>.")
PROMPTS = {
    "direct": ("Answer the following question directly, without any explanation. "
               f"{_ANSWER_FORMAT}\nQuestion: {{question}}\n"),
    "cot": ("Answer the following question. First think step by step, then give the final "
            f"answer. {_ANSWER_FORMAT}\nQuestion: {{question}}\n"),
    "rag": ("Answer the question using the documents below (and your own knowledge where they "
            f"do not help). {_ANSWER_FORMAT}\n\nDocuments:\n{{documents}}\nQuestion: "
            "{question}\n"),
}
ANSWER_PRIME, ANSWER_CLOSE = "<answer>", "</answer>"
# Zero-shot CoT's answer extraction (Kojima et al., 2022): a reasoning that ends without an
# answer is continued with this text.
COT_ANSWER_PRIME = "\nTherefore, the final answer is <answer>"


# ----------------------------------------------------------------------------------------------
# Config -> settings (every check happens here, before any data or model is loaded).
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """name: the table column; source: what `data.load_qa` reads (a file or an `hf:` id)."""

    name: str
    source: str


@dataclasses.dataclass(frozen=True)
class Settings:
    methods: tuple[str, ...]
    datasets: tuple[DatasetSpec, ...]
    sample_size: int | None  # None: every question
    rollout: agent.RolloutConfig
    output_dir: Path


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


def resolve_dataset(part: str, data_dir: str = "") -> DatasetSpec:
    """One entry of `config.datasets` -> (display name, source).

    `DISPLAY=SOURCE` names a source; a .jsonl / .parquet path is used as given (name: the file
    stem); `hf:NAME[:CONFIG]` / `tfds:...` ids go to `data.load_qa` (name: the config or the id);
    a bare FlashRAG name is `<data_dir>/<name>_test.jsonl` (or `_dev.jsonl`, or the upstream
    `_search_test.parquet`) when present, else `hf:RUC-NLPIR/FlashRAG_datasets:<name>`, whose
    split `qa.load_hf_dataset` picks: test, else dev.
    """
    display = None
    m = re.match(r"^([\w.-]+)=(.+)$", part)
    if m:
        display, part = m.group(1), m.group(2).strip()
    if part.startswith(("hf:", "tfds:")):
        default = part.split(":")[-1].rstrip("/").split("/")[-1]
        return DatasetSpec(display or default, part)
    if Path(part).suffix.lower() in (".jsonl", ".parquet"):
        check(Path(part).is_file(), "datasets", part, "an existing .jsonl / .parquet file")
        return DatasetSpec(display or Path(part).stem, part)
    name = part.lower()
    check(name in FLASHRAG_DATASETS, "datasets", part,
           f"comma-separated FlashRAG names {list(FLASHRAG_DATASETS)}, .jsonl/.parquet paths, "
           "hf:NAME[:CONFIG] ids or DISPLAY=SOURCE")
    if data_dir:
        for form in _LOCAL_FORMS:
            path = Path(data_dir) / form.format(name)
            if path.is_file():
                return DatasetSpec(display or name, str(path))
    return DatasetSpec(display or name, f"hf:{FLASHRAG_HUB}:{name}")


def build_settings(c: ml_collections.ConfigDict, workdir: str | None = None) -> Settings:
    """Validates the config (naming the bad key) and resolves the datasets."""
    methods = tuple(_split_list(c.methods))
    check(bool(methods) and all(m in METHODS for m in methods), "methods", c.methods,
           f"comma-separated names from {list(METHODS)}")
    check(len(set(methods)) == len(methods), "methods", c.methods, "no repeated method")
    needs_engine = bool({"rag", "agent"} & set(methods))
    check(c.engine in ENGINES, "engine", c.engine, f"one of {list(ENGINES)}")
    if needs_engine:
        if c.engine in ("searchr1", "zerosearch_wiki", "simulator_server"):
            check(str(c.url).startswith(("http://", "https://")), "url", c.url,
                   f"an http(s) URL for engine {c.engine!r}")
        if c.engine == "bm25" and not (c.index_dir and search.BM25SearchEngine.is_index_dir(
                c.index_dir)):
            check(c.corpus == "wiki" or Path(c.corpus).is_file(), "corpus", c.corpus,
                   "'wiki' or an existing Search-R1 jsonl file")
        if c.engine == "serpapi":
            key_env = search.http.SERPAPI_KEY_ENV
            check(bool(os.environ.get(key_env)), "engine", c.engine,
                   f"an engine that needs no key, or {key_env} set in the environment")
        if c.engine in ("simulator", "simulator_server"):
            variants = search.simulator.SIMULATOR_VARIANTS
            check(c.simulator.variant in variants, "simulator.variant", c.simulator.variant,
                   f"one of {list(variants)}")
    check(isinstance(c.topk, int) and c.topk >= 1, "topk", c.topk, "an integer >= 1")
    check(isinstance(c.sample_size, int) and (c.sample_size >= 1 or c.sample_size == -1),
           "sample_size", c.sample_size, "an integer >= 1, or -1 for every question")
    check(c.batch_size >= 1, "batch_size", c.batch_size, "an integer >= 1")
    for key in ("max_new_tokens", "cot_max_new_tokens"):
        check(c[key] >= 1, key, c[key], "an integer >= 1")
    check(c.dtype in ("float32", "bfloat16"), "dtype", c.dtype, "float32 or bfloat16")
    check(c.on_error in ("raise", "skip"), "on_error", c.on_error, "raise or skip")
    parts = _split_list(c.datasets)
    check(bool(parts), "datasets", c.datasets, "at least one dataset")
    datasets = tuple(resolve_dataset(p, c.data_dir) for p in parts)
    names = [d.name for d in datasets]
    check(len(set(names)) == len(names), "datasets", c.datasets,
           f"distinct display names (got {names}; use DISPLAY=SOURCE)")
    rollout = build(agent.RolloutConfig, c.agent, "agent", samples_per_prompt=1,
                    chat_template=c.chat_template)
    out = workdir or c.output_dir
    check(bool(out), "output_dir", c.output_dir, "a directory (or pass --workdir)")
    return Settings(methods, datasets, None if c.sample_size == -1 else c.sample_size, rollout,
                    Path(out))


# Settings that change a question's result; a workdir is only resumed with the same ones.
_RESULT_KEYS = ("seed", "model", "tokenizer", "dtype", "chat_template", "engine", "corpus",
                "url", "topk", "batch_size", "max_new_tokens", "cot_max_new_tokens", "prime_answer",
                "simulator", "agent")


def result_config(c: ml_collections.ConfigDict) -> dict:
    """The part of the config that `eval_config.json` records and a resume must match."""
    full = json.loads(c.to_json_best_effort())
    return {k: full[k] for k in _RESULT_KEYS}


# ----------------------------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------------------------


def load_datasets(settings: Settings, c: ml_collections.ConfigDict) -> dict[str, list]:
    """display name -> the fixed-seed sample of its questions (`qa.sample`, original order)."""
    out = {}
    for spec in settings.datasets:
        examples = load_qa(spec.source, on_error=c.on_error)
        if not examples:
            raise qa.DataError(f"{spec.source}: no questions")
        ids = [e.id for e in examples]
        if len(set(ids)) != len(ids):
            raise qa.DataError(f"{spec.source}: question ids are not unique, so the traces "
                               "could not tell its questions apart")
        out[spec.name] = qa.sample(examples, settings.sample_size, seed=c.seed)
        logger.info("%s: %d of %d questions from %s", spec.name, len(out[spec.name]),
                    len(examples), spec.source)
    return out


# ----------------------------------------------------------------------------------------------
# The traces file (resumable).
# ----------------------------------------------------------------------------------------------


def trace_key(record: dict) -> tuple[str, str, str]:
    return tuple(str(record[k]) for k in TRACE_KEYS)


def read_traces(path: str | Path, repair: bool = False) -> list[dict]:
    """Records of a traces file. A last line cut by a kill (no newline, invalid JSON) is dropped
    with a warning, and with `repair` cut off the file so appends start on a clean line; any
    other bad line is an error naming it."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")  # the last piece is b"" when the file ends with a newline
    records, good_bytes = [], 0
    for number, line in enumerate(lines, start=1):
        last = number == len(lines)
        if line.strip():
            try:
                record = json.loads(line)
                trace_key(record)
            except (ValueError, KeyError, TypeError) as err:
                if not last:
                    raise qa.DataError(f"{path}:{number}: not a trace record ({err}); the file "
                                       "is damaged beyond a cut last line") from None
                logger.warning("%s:%d: dropping a truncated last line (%d bytes) left by an "
                               "interrupted run", path, number, len(line))
                break
            records.append(record)
        good_bytes += len(line) + (0 if last else 1)
    if repair and good_bytes != len(data):
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    if repair and records and not data[:good_bytes].endswith(b"\n"):
        with open(path, "ab") as f:  # a complete record that only missed its newline
            f.write(b"\n")
    return records


class TraceWriter:
    """Appends records to the traces file, one durable batch at a time."""

    def __init__(self, path: Path):
        self._f = open(path, "a", encoding="utf-8")

    def append(self, records: Iterable[dict]) -> None:
        self._f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


# ----------------------------------------------------------------------------------------------
# Scores and tables (pure functions of the records).
# ----------------------------------------------------------------------------------------------


def aggregate(records: Iterable[dict], methods: Sequence[str],
              datasets: Sequence[str]) -> dict[tuple[str, str], dict[str, float]]:
    """Mean of each metric per (method, dataset), plus (method, "Avg"): the mean over the
    datasets that have results (the paper averages datasets, not questions). Each cell also
    holds "n", its number of questions (for Avg: the total)."""
    values: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in records:
        cell = values.setdefault((r["method"], r["dataset"]), {m: [] for m in METRICS})
        for m in METRICS:
            cell[m].append(float(r[m]))
    table = {}
    for method in methods:
        cells = []
        for name in datasets:
            if (method, name) in values:
                v = values[(method, name)]
                table[(method, name)] = {"n": len(v["f1"]),
                                         **{m: float(np.mean(v[m])) for m in METRICS}}
                cells.append(table[(method, name)])
        if cells:
            table[(method, "Avg")] = {"n": sum(c["n"] for c in cells),
                                      **{m: float(np.mean([c[m] for c in cells]))
                                         for m in METRICS}}
    return table


def _fmt(metric: str, value: float) -> str:
    return f"{value:.2f}" if metric == "searches" else f"{100 * value:.2f}"


def markdown_tables(table: dict, methods: Sequence[str], datasets: Sequence[str],
                    header: str = "") -> str:
    """One markdown table per metric: rows methods, columns datasets then Avg."""
    columns = [*datasets, "Avg"]
    out = ["# Evaluation results", ""]
    if header:
        out += [header, ""]
    counts = ", ".join(
        f"{d} {max((table[(m, d)]['n'] for m in methods if (m, d) in table), default=0)}"
        for d in datasets)
    out += [f"Questions per dataset: {counts}.", ""]
    for metric in METRICS:
        out += [f"## {METRIC_TITLES[metric]}", "", "| method | " + " | ".join(columns) + " |",
                "|---|" + "---:|" * len(columns)]
        for m in methods:
            cells = [_fmt(metric, table[(m, d)][metric]) if (m, d) in table else "-"
                     for d in columns]
            out.append(f"| {METHOD_TITLES[m]} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def csv_table(table: dict, methods: Sequence[str], datasets: Sequence[str]) -> str:
    """method,dataset,questions,cover_em,em,f1,searches (fractions; Avg rows last per method)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "dataset", "questions", *METRICS])
    for m in methods:
        for d in [*datasets, "Avg"]:
            if (m, d) in table:
                cell = table[(m, d)]
                w.writerow([m, d, cell["n"], *(f"{cell[k]:.6f}" for k in METRICS)])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Methods: a batch of questions -> trace records.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Runtime:
    """What the methods run on: the policy, its tokenizer, the engine (None without rag/agent)."""

    config: Any
    params: Any
    tokenizer: Any
    engine: search.SearchEngine | None
    chat_template: bool
    max_new_tokens: int
    cot_max_new_tokens: int
    prime_answer: bool
    rollout: agent.RolloutConfig
    seed: int


def _record(method: str, dataset: str, ex: qa.QAExample, prompt: str, response: str,
            turns: list[str], calls: list[dict], scores: dict, searches: int, **extra) -> dict:
    return {"method": method, "dataset": dataset, "id": ex.id, "question": ex.question,
            "golden_answers": list(ex.golden_answers), "prompt": prompt, "response": response,
            "turns": turns, "calls": calls, "answer": scores["answer"], "em": scores["em"],
            "cover_em": scores["cover_em"], "f1": scores["f1"], "searches": searches, **extra}


def _chat(rt: Runtime, text: str) -> str:
    return rt.tokenizer.chat_prompt(text) if rt.chat_template else text


def _continue(rt: Runtime, texts: list[str], max_new_tokens: int,
              close: bool = False) -> list[str]:
    """Greedy continuations of full prompt texts, stopped at `</answer>` (bucketed batch).

    close: the texts end inside a primed `<answer>`; a reply the model ends (EOS) without the
    closing tag is closed there, since all it wrote is the answer. A reply cut by the token
    limit stays open, so it has no answer.
    """
    stop = sampling.StopConditions.for_tokenizer(rt.tokenizer, (ANSWER_CLOSE,))
    out = sampling.generate(rt.config, rt.params, [rt.tokenizer.encode(t) for t in texts],
                            sampling.Greedy(), max_new_tokens=max_new_tokens, stop=stop,
                            rng=rt.seed)
    replies = []
    for row, n, stopped in zip(out["tokens"], out["lengths"], out["stopped"], strict=True):
        text = rt.tokenizer.decode(row[:n])
        if close and stopped and ANSWER_CLOSE not in text:
            text += f" {ANSWER_CLOSE}"
        replies.append(text)
    return replies


def run_baseline(rt: Runtime, method: str, dataset: str,
                 examples: Sequence[qa.QAExample]) -> list[dict]:
    """direct / cot / rag on a batch; rag sends every question to the engine once.

    With `prime_answer`, direct and rag replies start with `<answer>` (small instruct models
    otherwise answer in plain text that no extractor can score), and a cot reasoning that ends
    without an answer gets zero-shot CoT's second, answer-extraction pass. The primed text is
    part of the response; a primed answer closes at the end of the model's turn.
    """
    calls: list[list[dict]] = [[] for _ in examples]
    if method == "rag":
        contexts = [search.QueryContext(ex.question, ex.golden_answers, useful=True)
                    for ex in examples]
        results = rt.engine.search([ex.question for ex in examples], contexts=contexts)
        users = [PROMPTS["rag"].format(documents=res.text.strip(), question=ex.question)
                 for ex, res in zip(examples, results, strict=True)]
        calls = [[agent.SearchCall(0, ex.question, tuple(res.documents),
                                   res.metadata.get("useful"), res.ok).to_json()]
                 for ex, res in zip(examples, results, strict=True)]
    else:
        users = [PROMPTS[method].format(question=ex.question) for ex in examples]
    prompts = [_chat(rt, u) for u in users]
    if method == "cot":
        responses = _continue(rt, prompts, rt.cot_max_new_tokens)
        unanswered = [i for i, r in enumerate(responses) if rewards.extract_answer(r) is None]
        if rt.prime_answer and unanswered:
            heads = [responses[i].rstrip() + COT_ANSWER_PRIME for i in unanswered]
            tails = _continue(rt, [prompts[i] + h for i, h in zip(unanswered, heads,
                                                                     strict=True)],
                              rt.max_new_tokens, close=True)
            for i, head, tail in zip(unanswered, heads, tails, strict=True):
                responses[i] = head + tail
    else:
        prime = ANSWER_PRIME if rt.prime_answer else ""
        responses = [prime + r for r in _continue(rt, [p + prime for p in prompts],
                                                  rt.max_new_tokens, close=bool(prime))]
    return [_record(method, dataset, ex, prompt, resp, [resp], call,
                    rewards.score_response(resp, ex.golden_answers, flashrag_f1=True),
                    searches=len(call))
            for ex, prompt, resp, call in zip(examples, prompts, responses, calls, strict=True)]


def run_agent(rt: Runtime, dataset: str, examples: Sequence[qa.QAExample]) -> list[dict]:
    """The multi-turn search agent, greedy, one episode per question."""
    _, stats = agent.rollout(rt.config, rt.params, rt.tokenizer, examples, rt.engine,
                             rollout_config=rt.rollout, sampler=sampling.Greedy(), rng=rt.seed)
    # Scores as the rollout computed them: from the policy's own turns only (the inserted
    # documents and messages never count as an answer).
    return [_record("agent", dataset, ex, _chat(rt, agent.policy_prompt(ex.question)),
                    stats.responses[i], stats.turns[i], [c.to_json() for c in stats.calls[i]],
                    {"answer": stats.answers[i], "em": float(stats.em[i]),
                     "cover_em": float(stats.cover_em[i]),
                     "f1": rewards.flashrag_f1_score(stats.answers[i], ex.golden_answers)},
                    searches=int(stats.searches[i]), engine_calls=int(stats.engine_calls[i]),
                    truncated=bool(stats.truncated[i]))
            for i, ex in enumerate(examples)]


def run_batch(rt: Runtime, method: str, dataset: str, batch_index: int,
              examples: Sequence[qa.QAExample]) -> list[dict]:
    # The simulator's coin flips and samples restart per batch, so a resumed batch replays the
    # documents an uninterrupted run got.
    if rt.engine is not None and isinstance(rt.engine, search.Reseedable):
        rt.engine.reseed(zlib.crc32(f"{rt.seed}/{method}/{dataset}/{batch_index}".encode()))
    if method == "agent":
        return run_agent(rt, dataset, examples)
    return run_baseline(rt, method, dataset, examples)


def make_engine(c: ml_collections.ConfigDict, policy: tuple, tokenizer) -> search.SearchEngine:
    """The engine of rag and agent (`inputs.make_engine`); the simulator runs useful-only
    (noise probability 0), on the policy's weights unless `simulator.model` names others."""
    model = None
    if c.engine == "simulator":
        config, params = policy
        if c.simulator.model and c.simulator.model != c.model:
            config, params = models.load_pretrained(c.simulator.model, dtype=jnp.dtype(c.dtype))
            tokenizer = Tokenizer.from_pretrained(c.simulator.model)
        model = (config, params, tokenizer)
    return inputs.make_engine(c.engine, c, topk=c.topk, corpus=c.corpus, url=c.url,
                              index_dir=c.index_dir, simulator=c.simulator, model=model,
                              key="corpus" if c.engine == "bm25" else "engine")


# ----------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
    table: dict  # aggregate(...) of this run's questions
    markdown: str
    csv: str
    throughput: dict[str, dict[str, float]]  # method -> questions, seconds, questions_per_s


def _batches(examples: Sequence, size: int) -> list[Sequence]:
    return [examples[i:i + size] for i in range(0, len(examples), size)]


def _check_resume(out: Path, c: ml_collections.ConfigDict) -> None:
    path = out / RUN_CONFIG_FILE
    current = result_config(c)
    if path.exists():
        previous = json.loads(path.read_text())
        for key in _RESULT_KEYS:
            if previous.get(key) != current[key]:
                raise ConfigError(
                    f"config.{key} = {current[key]!r} differs from {previous.get(key)!r}, used "
                    f"by the run in {out}: its traces would mix two settings; use another "
                    "workdir")
    else:
        path.write_text(json.dumps(current, indent=2) + "\n")


def evaluate(c: ml_collections.ConfigDict, workdir: str | None = None) -> Report:
    """Runs (or resumes) the evaluation and writes traces, tables and throughput."""
    settings = build_settings(c, workdir)  # every config check, before any work
    data = load_datasets(settings, c)
    out = settings.output_dir
    out.mkdir(parents=True, exist_ok=True)
    # Two runs appending to one traces file would score questions twice: the second is refused.
    lock = open(out / LOCK_FILE, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ConfigError(f"another evaluation is running in {out}; wait for it or use another "
                          "workdir") from None
    try:
        return _evaluate(c, settings, data, out)
    finally:
        lock.close()


def _evaluate(c: ml_collections.ConfigDict, settings: Settings, data: dict,
              out: Path) -> Report:
    _check_resume(out, c)
    traces_path = out / TRACES_FILE
    done = {trace_key(r) for r in read_traces(traces_path, repair=True)}

    # (method, dataset, batch index, batch) with at least one question not yet in the traces.
    names = [d.name for d in settings.datasets]
    work = [(m, d, b, batch) for m in settings.methods for d in names
            for b, batch in enumerate(_batches(data[d], c.batch_size))
            if any((m, d, ex.id) not in done for ex in batch)]
    pending = sum(sum((m, d, ex.id) not in done for ex in batch) for m, d, _, batch in work)
    logger.info("%d questions to evaluate (%d already in %s)",
                pending, sum(len(v) for v in data.values()) * len(settings.methods) - pending,
                traces_path)

    throughput: dict[str, dict[str, float]] = {}
    if work:
        tokenizer = Tokenizer.from_pretrained(c.tokenizer or c.model)
        config, params = models.load_pretrained(c.model, dtype=jnp.dtype(c.dtype))
        needs_engine = any(m in ("rag", "agent") for m, *_ in work)
        engine = make_engine(c, (config, params), tokenizer) if needs_engine else None
        rt = Runtime(config, params, tokenizer, engine, c.chat_template, c.max_new_tokens,
                     c.cot_max_new_tokens, c.prime_answer, settings.rollout, c.seed)
        writer = TraceWriter(traces_path)
        bar = tqdm(total=pending, desc="evaluate", unit="q", dynamic_ncols=True)
        try:
            for method, dataset, b, batch in work:
                bar.set_description(f"{method}/{dataset}")
                t0 = time.perf_counter()
                records = [r for r in run_batch(rt, method, dataset, b, batch)
                           if trace_key(r) not in done]
                writer.append(records)
                elapsed = time.perf_counter() - t0
                t = throughput.setdefault(method, {"questions": 0, "seconds": 0.0})
                t["questions"] += len(records)
                t["seconds"] += elapsed
                bar.update(len(records))
        finally:
            bar.close()
            writer.close()
            if engine is not None:
                engine.close()
        for t in throughput.values():
            t["questions_per_s"] = t["questions"] / t["seconds"]
        (out / THROUGHPUT_FILE).write_text(json.dumps(throughput, indent=2) + "\n")

    # Tables from the traces file alone, restricted to this run's questions, in plan order (the
    # first record of a question wins), so the sums do not depend on when a batch was written.
    found: dict[tuple[str, str, str], dict] = {}
    for r in read_traces(traces_path):
        found.setdefault(trace_key(r), r)
    plan = [(m, d, ex.id) for m in settings.methods for d in names for ex in data[d]]
    records = [found[k] for k in plan if k in found]
    table = aggregate(records, settings.methods, names)
    header = (f"Model `{c.model}`, engine `{c.engine}`"
              + (f" over `{c.corpus}`" if c.engine == "bm25" else "")
              + f" (top {c.topk}), greedy decoding, sample seed {c.seed}.")
    md = markdown_tables(table, settings.methods, names, header)
    csv_text = csv_table(table, settings.methods, names)
    (out / RESULTS_MD).write_text(md)
    (out / RESULTS_CSV).write_text(csv_text)
    return Report(table, md, csv_text, throughput)


def _command(c: ml_collections.ConfigDict, workdir: str | None) -> int:
    report = evaluate(c, workdir)
    print(report.markdown)
    for method, t in report.throughput.items():
        print(f"throughput {method}: {t['questions']} questions in {t['seconds']:.1f} s = "
              f"{t['questions_per_s']:.3f} questions/s (compilation included)")
    return 0


def main(argv=None):
    run_command(_command, "evaluate.py", "output directory (resumes the evaluation it holds); "
                "default: config.output_dir", workdir_required=False,
                errors=(ConfigError, qa.DataError), argv=argv)

if __name__ == "__main__":
    main()
