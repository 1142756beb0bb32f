"""The embedded default, shortened to a smoke test of every stage (CI runs it from a
runtime-only install, exactly as the README's first command does; a few minutes on 2 cores):

    python -m zerosearch_jax.train --config=configs/smoke.py --workdir=runs/smoke

One format warm-up step, one simulator-SFT step, one RL step, two validation questions; every
output of the real job is written (warmup/, simulator_sft/, metrics, plots, checkpoints,
hf_policy/, final_validation.json). Nothing it measures means anything.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.total_steps = 1
    c.prompts_per_step = 2
    c.rollout.samples_per_prompt = 2
    c.data.validation_size = 2
    c.validation.every = 1
    c.checkpoint.every = 1
    c.warmup.steps = 1
    c.warmup.num_questions = 4
    c.simulator.sft.data.num_questions = 8
    c.simulator.sft.finetune.steps = 1
    c.simulator.sft.report.num_queries = 2
    c.simulator.sft.report.max_new_tokens = 32
    return c
