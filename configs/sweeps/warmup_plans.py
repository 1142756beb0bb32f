"""What the format warm-up demonstrates, and what RL then changes (docs/science.md, "Teaching
the second search").

Rows: the default warm-up (48 questions drawn as the training split is, one third two-hop;
10 steps), a stratified one (`warmup.stratify`: half two-hop; 64 questions, 16 steps, so each
is shown once), and the same with half the single-hop demonstrations searching their answer's
own page a second time (`warmup.reread_single_hop`), seeds 0 and 1 (seed 0's points first).
The rows differ in their warm-up, so each point runs its own (and its untrained validation)
and shares only the tuned simulator of a finished default run:

    python -m zerosearch_jax.train --config=configs/default.py --workdir=runs/default
    python -m zerosearch_jax.sweep --config=configs/default.py \\
        --sweep=configs/sweeps/warmup_plans.py --workdir=runs/warmup_plans \\
        --nokeep_checkpoints -- \\
        --config.simulator.tune=False --config.simulator.model=runs/default/simulator_sft/hf

A point costs about 16 minutes on a 2-core CPU (warm-up, two validations, 6 RL steps).
"""

STRATIFIED = {"warmup.stratify": True, "warmup.num_questions": 64, "warmup.steps": 16}
ROWS = (
    {},  # the default warm-up
    STRATIFIED,
    {**STRATIFIED, "warmup.reread_single_hop": 0.5},
)
SEEDS = (0, 1)


def get_sweep():
    return [{**row, "seed": seed} for seed in SEEDS for row in ROWS]
