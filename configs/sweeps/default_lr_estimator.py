"""Learning rate x advantage estimator on the embedded default config (4 runs).

    python -m zerosearch_jax.sweep --config=configs/default.py \\
        --sweep=configs/sweeps/default_lr_estimator.py --workdir=runs/sweep_lr_estimator

Each point is one `python -m zerosearch_jax.train` run in its own directory, e.g.
`runs/sweep_lr_estimator/lr=1e-06,estimator=grpo`; see docs/sweeps.md.
"""

from zerosearch_jax.sweep import product


def get_sweep():
    return product(**{
        "optim.lr": [1e-6, 2e-5],  # the paper's lr, and the default config's
        "algorithm.estimator": ["grpo", "reinforce"],  # GRPO's group baseline vs none
    })
