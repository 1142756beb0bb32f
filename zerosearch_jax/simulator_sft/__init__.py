"""Simulator tuning (docs/method.md §3, §8): collect real query -> documents pairs with a
policy and a real engine, label them useful / noisy, fine-tune the simulator LLM on them, and
report its quality against the prompted base model. Entry point:
`python -m zerosearch_jax.simulator_sft --config=configs/simulator_sft.py --workdir=...`.
"""

from zerosearch_jax.simulator_sft.collect import BudgetedEngine, CollectConfig, run_collection
from zerosearch_jax.simulator_sft.finetune import (
    SFTConfig,
    encode,
    run_finetune,
    sft_loss,
    sft_step,
)
from zerosearch_jax.simulator_sft.label import (
    JUDGES,
    LabelConfig,
    OpenAIJudge,
    Pair,
    contains_answer,
    label_pairs,
    load_pairs,
    pairs_from_collection,
    snippet,
    split_heldout,
)
from zerosearch_jax.simulator_sft.report import output_quality

__all__ = [
    "JUDGES", "BudgetedEngine", "CollectConfig", "LabelConfig", "OpenAIJudge", "Pair",
    "SFTConfig", "contains_answer", "encode", "label_pairs", "load_pairs", "output_quality",
    "pairs_from_collection", "run_collection", "run_finetune", "sft_loss", "sft_step", "snippet",
    "split_heldout",
]
