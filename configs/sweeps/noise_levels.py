"""More noise than the default's curriculum, on the embedded default's stages (docs/science.md,
"More noise on the same stages"): the curriculum from 0.25 to 0.75 (the paper's LLaMA-3.2-3B
start, its Qwen-2.5-7B end) and a constant 0.5 (the paper's "random"), seed 0. Does more noise
push RL to the second search two-hop questions need? Every point reuses one default run's
stages, so a point costs only its RL:

    python -m zerosearch_jax.sweep --config=configs/default.py \\
        --sweep=configs/sweeps/noise_levels.py --workdir=runs/noise \\
        --nokeep_checkpoints -- \\
        --config.stages_dir=runs/default --config.validation.before_rl=False
"""

ROWS = (
    {"curriculum.start": 0.25, "curriculum.end": 0.75},
    {"curriculum.schedule": "constant"},  # p_noise = curriculum.end = 0.5 at every step
)


def get_sweep():
    return [{**row, "seed": 0} for row in ROWS]
