"""More RL on the embedded default: twice the questions a step (8 x 4 episodes) for twice the
steps (12), four times the default's episodes, on seeds 0 and 1 (docs/science.md, the RL
budget probe). Does RL's gain over the warm-up grow with the episodes it sees? Every point
reuses one default run's stages, so a point costs only its RL (about four times the default's);
a finished point's checkpoints are dropped:

    python -m zerosearch_jax.sweep --config=configs/default.py \\
        --sweep=configs/sweeps/rl_budget.py --workdir=runs/rl_budget \\
        --nokeep_checkpoints -- \\
        --config.stages_dir=runs/default --config.validation.before_rl=False

The learning rate stays the default's (2e-5); the curriculum spans the 12 steps.
"""


def get_sweep():
    return [{"total_steps": 12, "prompts_per_step": 8, "validation.every": 12, "seed": seed}
            for seed in (0, 1)]
