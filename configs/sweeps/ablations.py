"""The paper's ablations in miniature, on the embedded default (docs/science.md).

Each row changes one thing against the default (exponential noise curriculum 0 -> 0.5, loss
mask on inserted documents, the tuned simulator, GRPO), with the default's RL budget, for
seeds 0 and 1 (seed 0's rows first, so a sweep stopped half-way has one seed of every row).
Every row reuses one default run's stages (the warmed-up policy, the tuned simulator) and its
step-0 validation, so a row costs only its RL:

    python -m zerosearch_jax.train --config=configs/default.py --workdir=runs/default
    python -m zerosearch_jax.sweep --config=configs/default.py \\
        --sweep=configs/sweeps/ablations.py --workdir=runs/ablations -- \\
        --config.stages_dir=runs/default --config.validation.before_rl=False

The sweep resumes: re-running the command runs the rows not yet done. To run it in parts,
add `--only=seed=0` (one seed of every row), then drop it for the rest.
"""

ROWS = (
    {},  # the default
    {"curriculum.schedule": "constant"},  # p_noise = 0.5 at every step (the paper's "random")
    {"curriculum.schedule": "constant", "curriculum.end": 0.0},  # no noisy documents
    {"algorithm.mask_observations": False},  # the loss covers the inserted documents too
    # The untuned base model with upstream's one-shot prompt (reply primed with "Doc 1:").
    {"simulator.tune": False, "simulator.variant": "prompted", "simulator.prime_reply": True},
    {"simulator.kind": "bm25"},  # the real engine during training, as at validation
    {"algorithm.estimator": "reinforce"},
    {"algorithm.estimator": "gae"},  # PPO: a critic from the policy's backbone
)
SEEDS = (0, 1)


def get_sweep():
    return [{**row, "seed": seed} for seed in SEEDS for row in ROWS]
