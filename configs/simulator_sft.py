"""Simulator tuning on this CPU: collect BM25 results on the synthetic world, label, fine-tune
SmolLM2-135M-Instruct, report (a few minutes on 2 cores):

    python -m zerosearch_jax.simulator_sft --config=configs/simulator_sft.py --workdir=runs/sim_sft

The embedded default training job (configs/default.py) runs this same pipeline as its first
stage. For the paper's settings see configs/simulator_sft_paper.py.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.simulator = "smollm2-135m-instruct"  # the model to tune (embedded name, HF dir, hub id).

    # -- questions ------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.train = "synthetic:train"  # synthetic:<split> | file.jsonl | file.parquet | hf:id
    c.data.synthetic_seed = 0  # the synthetic world (the RL job must use the same one).
    c.data.num_questions = 160  # questions sampled (seeded) for collection.
    c.data.on_error = "skip"  # malformed question rows: skip (logged) or raise.

    # -- collection with a real engine -------------------------------------------------------------
    c.collect = ml_collections.ConfigDict()
    c.collect.policy = "smollm2-135m-instruct"  # the policy that issues the queries.
    c.collect.query_sources = "policy,question"  # policy's own searches; the question itself.
    c.collect.engine = "bm25"  # bm25 | searchr1 (HTTP /retrieve) | serpapi
    c.collect.corpus = ""  # bm25: "" = the synthetic world's passages, "wiki", or a jsonl.
    c.collect.url = ""  # searchr1: the retriever's endpoint, e.g. http://127.0.0.1:8000/retrieve
    c.collect.depth = 10  # documents kept per call (deeper than topk: noisy examples need them).
    c.collect.max_calls = 0  # engine calls for the whole collection; 0 = no cap (SerpAPI: set!)
    c.collect.batch_size = 32  # questions per rollout batch (one durable write each).
    c.collect.max_turns = 1  # policy searches before its final answer.
    c.collect.max_new_tokens = 48  # per policy turn.
    c.collect.max_obs_tokens = 256
    c.collect.temperature = 1.0
    c.collect.top_p = 0.95

    # -- labelling -------------------------------------------------------------------------------
    c.label = ml_collections.ConfigDict()
    c.label.judge = "containment"  # containment | trajectory (the paper's rule) | llm
    c.label.judge_url = ""  # llm: an OpenAI-compatible endpoint root.
    c.label.judge_model = "default"
    c.label.pairs = ""  # own pairs, JSONL: question, golden_answers, query, documents[, label]
    c.label.on_error = "skip"  # malformed pair lines: skip (logged with the line number) or raise.
    c.label.topk = 5  # documents per target (the prompt asks for five).
    c.label.doc_words = 24  # words per document snippet (the prompt says about 30).
    c.label.balance = True  # as many useful as noisy examples.
    # containment: useful snippets start at the answer; noisy ones are the same pages with the
    # answer's sentences removed (hard negatives: the query's own entity, no answer).
    c.label.answer_focus = False  # no gain measured yet: docs/simulator_sft.md
    c.label.heldout_fraction = 0.1  # questions kept out of tuning, for the quality report.

    # -- fine-tuning -----------------------------------------------------------------------------
    c.finetune = ml_collections.ConfigDict()
    c.finetune.steps = 60  # upstream: 1000.
    c.finetune.batch_size = 4  # upstream: 2.
    c.finetune.max_length = 320  # prompt + target tokens.
    c.finetune.lr = 5e-5  # upstream: 1e-6 (a 14B model; a 135M one needs far larger steps).
    c.finetune.warmup_ratio = 0.1
    c.finetune.weight_decay = 0.0
    c.finetune.grad_clip = 1.0
    c.finetune.compute_dtype = "bfloat16"  # float32 master weights, bf16 matmul inputs.
    c.finetune.remat = True
    c.finetune.pack_length = 0  # tokens per packed row (several examples a row); 0: unpacked.
    c.finetune.micro_batch_size = 0  # rows per forward/backward; 0: batch_size, or 1 packed.
    # Loss weight of the gold answer's tokens in useful targets (1: plain NLL; see
    # docs/simulator_sft.md).
    c.finetune.answer_weight = 1.0
    # The loss weight of the tokens that end a document or the page (1: the plain loss).
    c.finetune.boundary_weight = 1.0
    c.finetune.checkpoint_every = 20
    c.finetune.keep = 2

    # -- quality report --------------------------------------------------------------------------
    c.report = ml_collections.ConfigDict()
    c.report.num_queries = 24  # held-out queries, each asked for useful and noisy documents.
    c.report.max_new_tokens = 224  # five ~30-word documents.
    c.report.temperature = 0.8  # the simulator's sampling temperature (upstream 0.8).
    c.report.compare_base = True  # also score the untuned model with the prompted template.
    c.report.base_prime_reply = True  # start the prompted model's reply with "Doc 1:".
    # Noisy pages may not complete the gold answer's tokens (`simulator.block_answer` of the
    # training configs); off here, so the report measures what the tuning alone achieves.
    c.report.block_answer = False
    return c
