"""The RL learning rate on the embedded default, two seeds (docs/science.md, the
learning-rate probe). Like the ablations, every point reuses one default run's stages, so a
point costs only its RL; a finished point's checkpoints are dropped:

    python -m zerosearch_jax.sweep --config=configs/default.py \\
        --sweep=configs/sweeps/learning_rate.py --workdir=runs/learning_rate \\
        --nokeep_checkpoints -- \\
        --config.stages_dir=runs/default --config.validation.before_rl=False

The default's own rate (2e-5) is the ablations' default row; 5e-6 and 5e-5 were probed on seed
0 only (docs/science.md). This sweep is the 1e-5 probe of 2026-12-04.
"""


def get_sweep():
    return [{"optim.lr": 1e-5, "seed": seed} for seed in (0, 1)]
