"""The simulated search engine: an LLM that writes the documents (docs/method.md §3).

Two back-ends share the prompt, the useful/noisy coin flip and the output clean-up:
- `LLMSimulator`: any model `models.load_pretrained` reads, in process, on the jitted sampler;
- `SimulatorServerClient`: an OpenAI-compatible chat endpoint (upstream serves a 14B simulator
  with SGLang), with the HTTP clients' timeouts, retries and `NO_INFORMATION` on failure.

Each query carries its own trajectory's question and gold answer in its `QueryContext`
(upstream paired the k-th query of a turn with the k-th question of the whole batch). One coin
flip per query decides useful vs noisy for all its documents: useful iff uniform() > p_noise,
where p_noise is the curriculum's current value (`noise_probability`, set by the trainer).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from zerosearch_jax.search.base import (
    QueryContext,
    SearchEngine,
    SearchResult,
    register_engine,
)
from zerosearch_jax.search.http import (
    HTTPSearchEngine,
    ProtocolError,
    RetryPolicy,
    SearchBackendError,
    check_url,
)

logger = logging.getLogger(__name__)

# The fine-tuned simulator's prompt, upstream's `search_simulate_sft` text to the newline.
# Interface constant: the released Simulation_LLM checkpoints were tuned on exactly this text
# ("useful" -> "noisy" in the noisy variant), and so is every simulator the SFT stage here tunes
# (`simulator_sft.label` builds its examples with `simulator_prompt`).
FINETUNED_TEMPLATE = (
    "You are the Google search engine.\n"
    "Given a query, you need to generate five {kind} documents for the query.\n\n"
    'The user is trying to answer the question: "{question}" whose answer is {answer}.\n'
    "Each document should contain about 30 words, and these documents should contain {kind} "
    "information.\n\n"
    "Query: {query}\n"
    "{Kind} Output:\n"
)

# The prompt-only simulator (no SFT): upstream's `search_simulate_prompt` text to the newline,
# the paper's Prompt-3B/7B/14B rows. Its useful and noisy prompts differ in more than one word
# (a one-shot demonstration each; the noisy one never states the question or its answer, and
# its first line ends with a space), so both are written out.
_GWB_USEFUL_DEMO = (
    "Doc 1: The George Washington Bridge, an iconic structure connecting New York City to New "
    "Jersey, opened on October 25, 1931. Designed by Othmar Ammann, it marked a major milestone "
    "in civil engineering.\n"
    "Doc 2: Originally the Hudson River Bridge, the George Washington Bridge was named after the "
    "U.S.'s first president. Its 3,500-foot suspension span was the world's longest at "
    "completion in 1931.\n"
    "Doc 3: The bridge was modified in 1962 with added lower deck lanes, increasing capacity and "
    "easing congestion. This expansion transformed the bridge into a double-decked structure "
    "with twelve lanes.\n"
    "Doc 4: Constructed over four years, the George Washington Bridge's steel towers and cables "
    "exemplified engineering progress. It crucially linked New York and New Jersey's "
    "transportation networks.\n"
    "Doc 5: Handling over 103 million annual vehicles, the George Washington Bridge is globally "
    "one of the busiest. The Port Authority of NY and NJ oversees its traffic and infrastructure "
    "maintenance.\n"
)
_GWB_NOISY_DEMO = (
    "Doc 1: The George Washington Bridge was a significant addition to New York's "
    "infrastructure, but there were many challenges during its construction, including budget "
    "overruns and worker strikes.\n"
    "Doc 2: While often mistaken for the opening of another iconic bridge, the Brooklyn Bridge, "
    "the George Washington Bridge has its own storied history involving political maneuvering "
    "and urban planning debates that shaped the bridge's final design.\n"
    "Doc 3: Discussions about the naming of the George Washington Bridge are interesting, as it "
    "was named to honor the first President of the United States. The name choice was "
    "significant given the geographical and historical implications of Washington's legacy.\n"
    "Doc 4: The bridge has been a point of contention over toll increases, traffic congestion "
    "solutions, and environmental impact assessments, which continue to affect policy decisions "
    "in the area.\n"
    "Doc 5: Considerations around the visual and architectural design of the George Washington "
    "Bridge also played a crucial role in its legacy as a landmark, balancing aesthetics with "
    "functionality.\n"
)
PROMPTED_USEFUL_TEMPLATE = (
    "You are the Google search engine.\n"
    "Given a query, you need to imitate the style of the following demos and generate five "
    "useful documents for the query.\n\n"
    "Here is an example:\n"
    "Query: George Washington Bridge opening year\n"
    "Useful Output:\n" + _GWB_USEFUL_DEMO + "\n"
    'The user is trying to answer the question: "{question}" whose answer is {answer}.\n'
    "You should generate documents that can help the user find the answer.\n"
    "Each document should contain about 30 words.\n"
    "You must directly output the English documents and not output any other texts.\n\n"
    "Query: {query}\n"
    "Useful Output:\n"
)
PROMPTED_NOISY_TEMPLATE = (
    "You are the Google search engine. \n"
    "Given a query, you need to imitate the style of the following demos and generate five "
    "related but noisy documents for the query.\n\n"
    "Here is an example:\n"
    "Query: George Washington Bridge opening year\n"
    "Noisy Output:\n" + _GWB_NOISY_DEMO + "\n"
    "Each document should contain about 30 words, and these documents should contain related "
    "but noisy information.\n"
    "You must directly output the English documents and not output any other texts.\n\n"
    "Query: {query}\n"
    "Noisy Output:\n"
)

SIMULATOR_VARIANTS = ("finetuned", "prompted")


def hop_context(query: str, context: QueryContext) -> QueryContext:
    """The context of the hop `query` asks about (a simulator with `hop_answers`).

    A multi-hop question's query that names none of its bridge answers asks the first hop (the
    question's subject), so the page's answer is the bridge entity (its first bridge answer),
    as the real engine's page for that query names the bridge, not the final answer; a query
    that names the bridge asks the last hop and keeps the gold answers. Questions without
    bridge answers (single-hop ones, data that does not know its hops) are unchanged.
    Upstream's simulator is told the final answer whatever the query (the default here too).
    """
    if not context.bridge_answers:
        return context
    q = query.casefold()
    if any(b.casefold() in q for b in context.bridge_answers):
        return context
    return dataclasses.replace(context, golden_answers=context.bridge_answers[:1])


def simulator_prompt(query: str, context: QueryContext, useful: bool,
                     variant: str = "finetuned") -> str:
    """The user message asking for five useful or noisy documents for `query` (upstream's text:
    `finetuned` for tuned simulators, `prompted` for prompt-only ones)."""
    if variant not in SIMULATOR_VARIANTS:
        raise ValueError(f"simulator variant must be one of {SIMULATOR_VARIANTS}, got {variant!r}")
    kind = "useful" if useful else "noisy"
    answer = context.golden_answers[0] if context.golden_answers else ""
    if variant == "prompted":
        template = PROMPTED_USEFUL_TEMPLATE if useful else PROMPTED_NOISY_TEMPLATE
    else:
        template = FINETUNED_TEMPLATE
    # One pass of str.format: braces inside the question or query stay as they are.
    return template.format(kind=kind, Kind=kind.capitalize(), query=query,
                           question=context.question, answer=answer)


_FIELDS = ("question", "answer", "query")
_SENTINEL = re.compile("\x00(" + "|".join(_FIELDS) + ")\x00")


@dataclasses.dataclass(frozen=True)
class SimulatorPrompt:
    """The simulator's chat prompt as token pieces: constant ids and the fields `question`,
    `answer`, `query`, for the useful and the noisy variant.

    Every path builds the prompt from these pieces (the in-graph rollout on device, the host
    `LLMSimulator`, the SFT examples), so a tuned simulator sees at RL time exactly the tokens
    it was tuned on. A space before a field belongs to the field (` Paris`, as the policy writes
    a query after `<search>`), so no piece boundary splits a word from its space.
    """

    useful: tuple[tuple[int, ...] | str, ...]
    noisy: tuple[tuple[int, ...] | str, ...]
    spaced: frozenset[str]  # fields written with a leading space

    @classmethod
    def make(cls, tokenizer, variant: str = "finetuned") -> SimulatorPrompt:
        marks = {f: f"\x00{f}\x00" for f in _FIELDS}
        context = QueryContext(marks["question"], (marks["answer"],))
        variants, spaced = [], set()
        for useful in (True, False):
            text = tokenizer.chat_prompt(
                simulator_prompt(marks["query"], context, useful, variant), system="")
            parts = _SENTINEL.split(text)  # text, field, text, field, ..., text
            pieces: list = []
            for i, part in enumerate(parts):
                if i % 2:
                    pieces.append(part)
                    continue
                if i + 1 < len(parts) and part.endswith(" "):
                    part = part[:-1]
                    spaced.add(parts[i + 1])
                if part:
                    pieces.append(tuple(tokenizer.encode(part)))
            variants.append(tuple(pieces))
        return cls(variants[0], variants[1], frozenset(spaced))

    def pieces(self, useful: bool) -> tuple[tuple[int, ...] | str, ...]:
        return self.useful if useful else self.noisy

    @property
    def max_constant_length(self) -> int:
        return max(sum(len(p) for p in v if not isinstance(p, str))
                   for v in (self.useful, self.noisy))

    def field_ids(self, tokenizer, name: str, value: str) -> list[int]:
        """A field's ids: its text stripped, with a leading space where the template has one."""
        value = value.strip()
        if not value:
            return []
        return tokenizer.encode(" " + value if name in self.spaced else value)

    @staticmethod
    def answer_bans(tokenizer, golden_answers: Sequence[str]) -> list[list[int]]:
        """What a noisy page may not contain: the gold answer its prompt names (the first), as
        token sequences, spelled after a space and at the start of a token (`(1883`). A page
        can then hold the answer's pieces (a surname, another year) but not the answer."""
        answer = golden_answers[0].strip() if golden_answers else ""
        if not answer:
            return []
        seqs = [tokenizer.encode(" " + answer), tokenizer.encode(answer)]
        return [list(q) for i, q in enumerate(seqs) if q and q not in seqs[:i]]

    def ids(self, tokenizer, query: str, context: QueryContext, useful: bool) -> list[int]:
        """The whole prompt's ids on the host (queries as text)."""
        values = {"question": context.question, "query": query,
                  "answer": context.golden_answers[0] if context.golden_answers else ""}
        out: list[int] = []
        for piece in self.pieces(useful):
            out += self.field_ids(tokenizer, piece, values[piece]) if isinstance(piece, str) \
                else list(piece)
        return out


def clean_simulator_output(text: str, topk: int = 5) -> tuple[str, ...]:
    """Upstream clean-up: blank lines collapsed, cut at `Doc {topk+1}`; one document a line."""
    text = text.split(f"Doc {topk + 1}")[0]
    lines = [line.strip() for line in re.split(r"\n+", text)]
    return tuple(line for line in lines if line)


class _SimulatorMixin:
    """Shared by both back-ends: the coin flip, prompts and clean-up."""

    name = "simulator"

    def _init_simulator(self, *, variant: str, topk: int, noise_probability: float, seed: int,
                        hop_answers: bool = False):
        if variant not in SIMULATOR_VARIANTS:
            raise ValueError(
                f"simulator variant must be one of {SIMULATOR_VARIANTS}, got {variant!r}")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.variant = variant
        self.topk = topk
        self.hop_answers = hop_answers
        self.noise_probability = noise_probability
        self._coins = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        """Restarts the coin flips from `seed`. The trainer reseeds every step, so a run resumed
        from a checkpoint replays exactly the documents an uninterrupted run would have seen."""
        self._coins = np.random.default_rng(seed)

    @property
    def noise_probability(self) -> float:
        return self._noise

    @noise_probability.setter
    def noise_probability(self, p: float) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"noise_probability must be in [0, 1], got {p}")
        self._noise = float(p)

    def _plan(self, queries: Sequence[str], contexts: Sequence[QueryContext] | None):
        """(useful flags, user prompts, contexts) for a batch; every query needs its own
        context. With `hop_answers` each context is its query's hop's (`hop_context`)."""
        if contexts is None:
            raise ValueError("the simulator needs a QueryContext (question, gold answers) "
                             "for every query")
        if self.hop_answers:
            contexts = [hop_context(q, c) for q, c in zip(queries, contexts, strict=True)]
        useful = [c.useful if c.useful is not None else bool(self._coins.uniform() > self._noise)
                  for c in contexts]
        prompts = [simulator_prompt(q, c, u, self.variant)
                   for q, c, u in zip(queries, contexts, useful, strict=True)]
        return useful, prompts, contexts

    def _result(self, raw: str, useful: bool, prompt: str, latency_s: float) -> SearchResult:
        docs = clean_simulator_output(raw, self.topk)
        return SearchResult(documents=docs, ok=bool(docs), error=None if docs else "empty output",
                            latency_s=latency_s,
                            metadata={"useful": useful, "prompt": prompt, "raw": raw})


class LLMSimulator(_SimulatorMixin, SearchEngine):
    """An in-process simulator LLM on the jitted sampler.

    config/params: any model `models.load_pretrained` reads; tokenizer: its `Tokenizer`.
    Generation samples at `temperature` (0.8 upstream) for at most `max_new_tokens` (600) and
    stops early once `Doc {topk+1}` appears, since everything after it is cut anyway.
    `prime_reply` starts the assistant turn with `Doc 1:` (helps small prompted models keep the
    format; the text is part of the output). `batch_size`: generation pads every call to at
    least this many rows (a rollout's row count), so the calls of a run, whose number of
    queries varies turn by turn, share one compiled program instead of compiling one per size.
    `block_answer`: a noisy page never completes the gold answer's tokens
    (`SimulatorPrompt.answer_bans`): the noisy prompt names the answer too, and a small tuned
    simulator copies it whichever variant it is asked for (docs/simulator_sft.md).
    `hop_answers`: a multi-hop question's first-hop query gets a page for the bridge entity,
    not the final answer (`hop_context`; off upstream).
    """

    def __init__(self, config, params, tokenizer, *, variant: str = "finetuned", topk: int = 5,
                 temperature: float = 0.8, max_new_tokens: int = 600,
                 noise_probability: float = 0.0, prime_reply: bool = False, seed: int = 0,
                 batch_size: int = 0, block_answer: bool = False, hop_answers: bool = False):
        SearchEngine.__init__(self)
        self._init_simulator(variant=variant, topk=topk, noise_probability=noise_probability,
                             seed=seed, hop_answers=hop_answers)
        import jax

        from zerosearch_jax import sampling

        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.max_new_tokens = max_new_tokens
        self.prime_reply = prime_reply
        self.batch_size = batch_size
        self.block_answer = block_answer
        self._sampler = sampling.Temperature(temperature)
        self._stop = sampling.StopConditions.for_tokenizer(tokenizer, [f"Doc {topk + 1}"])
        self.prompt = SimulatorPrompt.make(tokenizer, variant)
        self.temperature = temperature
        self._key = jax.random.key(seed)
        self._calls = 0
        self.generated_tokens = 0  # tokens the simulator sampled, for throughput reports
        self.placement = None  # where generation runs (`place`); None: the default device

    def place(self, placement) -> None:
        """Moves the weights onto a `sharding.Placement` (sharded by its rules, e.g. a
        simulator sub-mesh of its own); generation then splits the batch and the KV cache
        along its batch axes."""
        self.params = placement.put(self.params, placement.param_shardings(self.config))
        self.placement = placement

    def reseed(self, seed: int) -> None:
        import jax

        super().reseed(seed)
        self._key, self._calls = jax.random.key(seed), 0

    def _search(self, queries, contexts):
        import jax

        from zerosearch_jax import sampling

        start = time.perf_counter()
        useful, prompts, contexts = self._plan(queries, contexts)
        prefix = "Doc 1:" if self.prime_reply else ""
        prefix_ids = self.tokenizer.encode(prefix) if prefix else []
        ids = [self.prompt.ids(self.tokenizer, q, c, u) + prefix_ids
               for q, c, u in zip(queries, contexts, useful, strict=True)]
        banned = None
        if self.block_answer:
            banned = [[] if u else self.prompt.answer_bans(self.tokenizer, c.golden_answers)
                      for c, u in zip(contexts, useful, strict=True)]
        self._calls += 1
        out = sampling.generate(
            self.config, self.params, ids, self._sampler,
            max_new_tokens=self.max_new_tokens, stop=self._stop,
            rng=jax.random.fold_in(self._key, self._calls), placement=self.placement,
            min_batch=self.batch_size, banned=banned)
        latency = (time.perf_counter() - start) / len(queries)
        self.generated_tokens += int(out["lengths"].sum())
        return [self._result(prefix + self.tokenizer.decode(row[:n]), u, p, latency)
                for row, n, u, p in zip(out["tokens"], out["lengths"], useful, prompts,
                                        strict=True)]


class SimulatorServerClient(_SimulatorMixin, HTTPSearchEngine):
    """A simulator behind an OpenAI-compatible `/v1/chat/completions` endpoint (SGLang, vLLM).

    url: the server root, e.g. `http://10.0.0.2:30000`; model: the served model name.
    """

    def __init__(self, url: str, model: str = "default", *, variant: str = "finetuned",
                 topk: int = 5, temperature: float = 0.8, max_new_tokens: int = 600,
                 noise_probability: float = 0.0, seed: int = 0, api_key: str | None = None,
                 retry: RetryPolicy | None = None, max_workers: int = 16,
                 hop_answers: bool = False):
        HTTPSearchEngine.__init__(self, topk=topk, retry=retry, max_workers=max_workers)
        self._init_simulator(variant=variant, topk=topk, noise_probability=noise_probability,
                             seed=seed, hop_answers=hop_answers)
        self.url = check_url(url).rstrip("/") + "/v1/chat/completions"
        self.model, self.temperature, self.max_new_tokens = model, temperature, max_new_tokens
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _search(self, queries, contexts):
        useful, prompts, _ = self._plan(queries, contexts)
        with ThreadPoolExecutor(min(self.max_workers, len(queries))) as pool:
            return list(pool.map(self._one, useful, prompts))

    def _one(self, useful: bool, prompt: str) -> SearchResult:
        start = time.perf_counter()
        body = {"model": self.model, "temperature": self.temperature,
                "max_tokens": self.max_new_tokens,
                "messages": [{"role": "system", "content": ""},
                             {"role": "user", "content": prompt}]}
        try:
            raw = self.request("POST", self.url, parse_chat, json=body, headers=self._headers)
        except SearchBackendError as e:
            return self._failed([prompt], str(e), time.perf_counter() - start)[0]
        return self._result(raw, useful, prompt, time.perf_counter() - start)


def parse_chat(payload) -> str:
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ProtocolError(f"no choices[0].message.content in {str(payload)[:200]}") from None
    if not isinstance(content, str):
        raise ProtocolError(f"message content is {type(content).__name__}, not a string")
    return content


register_engine("simulator", LLMSimulator)
register_engine("simulator_server", SimulatorServerClient)
