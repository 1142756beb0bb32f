"""What a run reads through its config: questions, models, real search engines.

Shared by the trainer, evaluation and the simulator-tuning pipeline (which must not reach up
into the trainer for them); every error names the config key it comes from (`ConfigError`).
"""

from __future__ import annotations

import logging

import ml_collections

from zerosearch_jax import agent, models, search
from zerosearch_jax.data import qa, synthetic
from zerosearch_jax.data.sources import load_qa
from zerosearch_jax.settings import ConfigError
from zerosearch_jax.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def load_examples(spec: str, c: ml_collections.ConfigDict, tokenizer: Tokenizer | None = None,
                  rollout: agent.RolloutConfig | None = None,
                  key: str = "data") -> list[qa.QAExample]:
    """`synthetic:<split>`, or comma-separated files / `hf:` ids (e.g. NQ + HotpotQA).

    With a tokenizer and a rollout config, every question is also checked against
    `rollout.max_prompt_tokens` here, at load: a question that cannot be rolled out follows
    `data.on_error` (skipped with a warning, or an error naming it) instead of failing the step
    that draws it, at the same step on every resume. `key` names the config key in errors.
    """
    out: list[qa.QAExample] = []
    for part in (s.strip() for s in spec.split(",") if s.strip()):
        if part.startswith("synthetic:"):
            world = synthetic.build_world(synthetic.WorldConfig(seed=c.data.synthetic_seed))
            out += world.questions(part.split(":", 1)[1])
            continue
        try:
            out += load_qa(part, on_error=c.data.on_error)
        except FileNotFoundError as e:
            raise ConfigError(f"config.{key}: {e}") from None
    if tokenizer is not None and rollout is not None:
        out = admissible(out, tokenizer, rollout, c.data.on_error)
    if not out:
        raise ConfigError(f"config.{key}: no usable questions in {spec!r}")
    return out


def admissible(examples, tokenizer: Tokenizer, rollout: agent.RolloutConfig,
               on_error: str) -> list[qa.QAExample]:
    """The examples whose policy prompt fits `rollout.max_prompt_tokens`; the others raise a
    `DataError` or are skipped with a warning (`on_error`). A question far longer than any
    prompt (over 32 characters a token) is refused before it is tokenized."""
    kept = []
    for ex in examples:
        if len(ex.question) > 32 * rollout.max_prompt_tokens:
            why = f"{len(ex.question)} characters"
        else:
            n = len(agent.prompt_ids(tokenizer, ex.question, rollout.chat_template))
            if n <= rollout.max_prompt_tokens:
                kept.append(ex)
                continue
            why = f"{n} tokens"
        message = (f"question {ex.id!r} ({ex.data_source}): its prompt has {why}, more than "
                   f"rollout.max_prompt_tokens={rollout.max_prompt_tokens}")
        if on_error == "raise":
            raise qa.DataError(message)
        logger.warning("skipping %s", message)
    return kept


def world_passages(c) -> list[search.Passage]:
    world = synthetic.build_world(synthetic.WorldConfig(seed=c.data.synthetic_seed))
    return [search.Passage.from_contents(p["id"], p["contents"]) for p in world.passages]


REAL_ENGINES = ("bm25", "searchr1", "zerosearch_wiki", "serpapi")
SIMULATED_ENGINES = ("simulator", "simulator_server")


def make_engine(kind: str, c: ml_collections.ConfigDict, *, topk: int, corpus: str = "",
                url: str = "", index_dir: str = "", simulator: ml_collections.ConfigDict | None
                = None, model: tuple | None = None, server_model: str = "default",
                noise_probability: float = 0.0, batch_size: int = 0,
                key: str = "engine") -> search.SearchEngine:
    """The one engine factory: training, validation, evaluation and simulator tuning build
    their engines here, by `search` registry name.

    kind: `bm25` over `corpus` ("": the synthetic world's passages of `c.data.synthetic_seed`;
    "wiki"; a Search-R1 jsonl; an index kept in `index_dir`), `searchr1` / `zerosearch_wiki`
    (HTTP at `url`), `serpapi`; `simulator` (in process; model = (config, params, tokenizer))
    or `simulator_server` (OpenAI-compatible at `url`, serving `server_model`), with the
    `simulator` config section's variant, temperature, max_new_tokens, prime_reply,
    hop_answers and block_answer (in process only: a server cannot ban token sequences).
    Errors name the config `key` the kind came from.
    """
    try:
        if kind == "bm25":
            source = ({"passages": world_passages(c)} if not corpus else
                      {"corpus": corpus, "index_dir": index_dir or None})
            return search.make_engine(kind, topk=topk, **source)
        if kind in ("searchr1", "zerosearch_wiki"):
            return search.make_engine(kind, url=url, topk=topk)
        if kind == "serpapi":
            return search.make_engine(kind, topk=topk)
        if kind in SIMULATED_ENGINES:
            s = simulator
            common = dict(variant=s.variant, topk=topk, temperature=s.temperature,
                          max_new_tokens=s.max_new_tokens, noise_probability=noise_probability,
                          seed=c.seed, hop_answers=s.get("hop_answers", False))
            if kind == "simulator_server":
                if s.block_answer:
                    raise ConfigError(
                        "config.simulator.block_answer needs the in-process simulator (kind "
                        "llm): a chat server cannot ban token sequences; set it to False")
                return search.make_engine(kind, url=url, model=server_model, **common)
            config, params, tokenizer = model
            return search.make_engine(kind, config=config, params=params, tokenizer=tokenizer,
                                      prime_reply=s.prime_reply, batch_size=batch_size,
                                      block_answer=s.block_answer, **common)
    except FileNotFoundError as e:
        raise ConfigError(f"config.{key}: {e}") from None
    raise ConfigError(f"config.{key} = {kind!r}: expected one of "
                      f"{', '.join(REAL_ENGINES + SIMULATED_ENGINES)}")


def make_validation_engine(c: ml_collections.ConfigDict) -> search.SearchEngine:
    """The real engine of validation (and of the format warm-up's demonstrations)."""
    v = c.validation
    key = "validation.corpus" if v.engine == "bm25" else "validation.engine"
    return make_engine(v.engine, c, corpus=v.corpus, url=v.url, topk=v.topk, key=key)


def check_models(c: ml_collections.ConfigDict) -> None:
    """Every model the run will load exists (a path, an embedded name, or a hub id it can
    fetch), before any stage spends time: the error names the key."""
    keys = [("policy", c.policy), ("tokenizer", c.tokenizer)]
    if c.simulator.kind == "llm":
        keys.append(("simulator.model", c.simulator.model))
    for key, name in keys:
        if name:
            try:
                models.resolve_model(name)
            except models.WeightsError as e:
                raise ConfigError(f"config.{key}: {e}") from None
