"""The search agent: the ZeroSearch policy template and the multi-turn rollout."""

from zerosearch_jax.agent import episode, warmup
from zerosearch_jax.agent.rollout import (
    EpisodeStats,
    RolloutBatch,
    RolloutConfig,
    SearchCall,
    assemble_batch,
    observation_ids,
    prompt_ids,
    rollout,
)
from zerosearch_jax.agent.template import (
    INVALID_ACTION,
    POLICY_TEMPLATE,
    STOP_TAGS,
    Action,
    information_block,
    parse_action,
    policy_prompt,
)

__all__ = [
    "INVALID_ACTION", "POLICY_TEMPLATE", "STOP_TAGS", "Action", "EpisodeStats", "RolloutBatch",
    "RolloutConfig", "SearchCall", "assemble_batch", "episode", "information_block",
    "observation_ids", "parse_action", "policy_prompt", "prompt_ids", "rollout", "warmup",
]
