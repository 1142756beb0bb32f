"""A repeated query answered as a real engine would (`rollout.reuse_repeated_queries`), on the
embedded default's stages (docs/science.md, "A repeated query gets the same page").

Upstream's simulator flips a new useful/noisy coin and writes a new page for every call, so
under noise searching the same query twice is rewarded; at validation BM25 returns the same
page, and the earlier ablations' policies that learned to search twice repeated their first
query word for word. With the option on, only a new query can get a new page. Each row with
and without it, under the default curriculum and a constant p_noise = 0.5, seeds 0 and 1
(seed 0's points first); every point reuses one default run's stages, so it costs only its RL:

    python -m zerosearch_jax.sweep --config=configs/default.py \\
        --sweep=configs/sweeps/repeated_queries.py --workdir=runs/repeated \\
        --nokeep_checkpoints -- \\
        --config.stages_dir=runs/default --config.validation.before_rl=False
"""

ROWS = (
    {},  # the default
    {"rollout.reuse_repeated_queries": True},
    {"curriculum.schedule": "constant"},  # p_noise = curriculum.end = 0.5 at every step
    {"curriculum.schedule": "constant", "rollout.reuse_repeated_queries": True},
)
SEEDS = (0, 1)


def get_sweep():
    return [{**row, "seed": seed} for seed in SEEDS for row in ROWS]
