"""Evaluation of a policy and the paper's baselines on the FlashRAG QA sets (docs/method.md §9).

Defaults follow the paper: the seven FlashRAG sets, 500 questions each (all of Bamboogle), greedy
decoding, the four methods; the engine is BM25 over the offline Wikipedia summaries (the paper
used Google through SerpAPI, `--config.engine=serpapi`). The embedded SmolLM2-135M-Instruct is
the default policy; pass any checkpoint with `--config.model`:

    python -m zerosearch_jax.evaluate --config=configs/evaluate.py --workdir=runs/eval \\
        --config.model=runs/default/hf_policy --config.datasets=nq,hotpotqa,bamboogle \\
        --config.data_dir=data/qa --config.sample_size=50
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # the question samples and the simulator's coin flips derive from it.
    c.output_dir = ""  # where traces/tables go when --workdir is not given.

    # -- what is evaluated ----------------------------------------------------------------------
    c.methods = "direct,cot,rag,agent"  # comma-separated: direct | cot | rag | agent
    # Comma-separated bare FlashRAG names (nq, triviaqa, popqa, hotpotqa, 2wikimultihopqa,
    # musique, bamboogle), .jsonl/.parquet paths, hf:NAME[:CONFIG] ids, or DISPLAY=SOURCE.
    c.datasets = "nq,triviaqa,popqa,hotpotqa,2wikimultihopqa,musique,bamboogle"
    c.data_dir = ""  # bare names look for <name>_test.jsonl etc. here first, then on the hub.
    c.sample_size = 500  # questions per dataset (fixed-seed sample); -1 = all of them.
    c.on_error = "raise"  # malformed dataset rows: raise (naming file:line) or skip (logged).

    # -- models ---------------------------------------------------------------------------------
    c.model = "smollm2-135m-instruct"  # policy: embedded name, HF dir, .gguf file or hub id.
    c.tokenizer = ""  # defaults to the model's.
    c.dtype = "bfloat16"  # weights and KV cache: float32 | bfloat16.
    c.chat_template = True  # wrap every prompt in the tokenizer's chat template.

    # -- search engine (rag and agent) ------------------------------------------------------------
    c.engine = "bm25"  # bm25 | searchr1 | zerosearch_wiki | serpapi | simulator | simulator_server
    c.corpus = "wiki"  # bm25: "wiki" (offline Wikipedia summaries) or a Search-R1 jsonl path.
    c.index_dir = ""  # bm25: load the index from here, or build it and save it here.
    c.url = ""  # searchr1 / zerosearch_wiki: /retrieve endpoint; simulator_server: server root.
    c.topk = 3  # documents per search (Search-R1: 3; the paper's Google runs: 5).
    c.simulator = ml_collections.ConfigDict()
    c.simulator.model = ""  # simulator engine: its model ("" = the policy's weights).
    c.simulator.variant = "prompted"  # finetuned (a Simulation_LLM checkpoint) | prompted.
    c.simulator.temperature = 0.8  # upstream sampling temperature of the simulator.
    c.simulator.max_new_tokens = 256  # per simulated result page (upstream: 600).
    c.simulator.prime_reply = True  # start the reply with "Doc 1:" (small prompted models).
    c.simulator.block_answer = False  # noisy pages may not complete the gold answer's tokens.
    c.simulator.hop_answers = False  # a two-hop question's first hop gets its bridge's page.

    # -- generation -----------------------------------------------------------------------------
    c.batch_size = 32  # questions per generation batch (padded to 2/4/8/multiples of 8).
    c.max_new_tokens = 64  # direct and rag answers.
    c.cot_max_new_tokens = 512  # chain of thought: reasoning plus answer.
    # direct/rag replies start with "<answer>"; a cot reasoning without an answer is continued
    # with "Therefore, the final answer is <answer>" (zero-shot CoT's answer extraction).
    c.prime_answer = True
    c.agent = ml_collections.ConfigDict()
    c.agent.max_turns = 2  # searches before the final turn (paper runs: 2; upstream README: 5).
    c.agent.max_new_tokens = 500  # per policy turn.
    c.agent.max_obs_tokens = 500  # per inserted information block, wrapper tags included.
    c.agent.max_prompt_tokens = 2048  # longer prompts are an error naming the question.
    c.agent.max_context_tokens = 4096  # an episode whose next turn could pass this ends.
    return c
