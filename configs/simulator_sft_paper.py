"""Simulator tuning at the paper's scale (docs/method.md §8): a Qwen-2.5-7B-Instruct policy
searches a real engine on NQ + HotpotQA training questions, pairs are labelled by the paper's
trajectory rule, and a Qwen-2.5 simulator is fully fine-tuned with lr 1e-6, batch 2, 1000 steps.

Needs the training data (`huggingface-cli download --repo-type dataset sunhaonlp/ZeroSearch_dataset
--local-dir ZeroSearch_dataset`) and a real engine: a Search-R1 retriever
(`zerosearch-retrieval-server` or upstream's) at collect.url (its /retrieve endpoint), or
SerpAPI (set SERPAPI_API_KEY and collect.max_calls). Then:

    python -m zerosearch_jax.simulator_sft --config=configs/simulator_sft_paper.py \\
        --workdir=runs/simulator_sft_14b

and train with `--config.simulator.kind=llm --config.simulator.model=runs/simulator_sft_14b/hf
--config.simulator.tune=False` (the paper configs already set tune=False; configs/default.py
would otherwise tune the tuned model again), or serve that directory with SGLang / vLLM and keep
`simulator.kind=server`.
"""

from configs import simulator_sft


def get_config():
    c = simulator_sft.get_config()
    c.simulator = "Qwen/Qwen2.5-14B-Instruct"  # the paper tunes 3B, 7B and 14B simulators.

    c.data.train = "ZeroSearch_dataset/train.parquet"  # NQ + HotpotQA, upstream format.
    c.data.num_questions = 12000  # about 20k labelled pairs before balancing.

    c.collect.policy = "Qwen/Qwen2.5-7B-Instruct"  # docs/method.md §8.
    c.collect.query_sources = "policy"  # the policy's own searches only.
    c.collect.engine = "searchr1"  # or "serpapi" (Google, as upstream; set max_calls).
    c.collect.url = "http://127.0.0.1:8000/retrieve"  # the Search-R1 retriever's endpoint.
    c.collect.depth = 5
    c.collect.batch_size = 64
    c.collect.max_turns = 4
    c.collect.max_new_tokens = 500
    c.collect.max_obs_tokens = 500

    c.label.judge = "trajectory"  # the paper's rule; "llm" reproduces the released data's judge.
    c.label.doc_words = 30

    c.finetune.steps = 1000
    c.finetune.batch_size = 2
    c.finetune.max_length = 1024
    c.finetune.lr = 1e-6
    c.finetune.warmup_ratio = 0.0
    c.finetune.checkpoint_every = 100

    c.report.num_queries = 200
    c.report.max_new_tokens = 600
    c.report.base_prime_reply = False
    return c
