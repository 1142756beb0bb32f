"""The search agent: the ZeroSearch policy template, the environment it acts in, and the
multi-turn rollouts (the host loop `rollout`, the in-graph `episode`)."""

from zerosearch_jax.agent import environment, episode, warmup
from zerosearch_jax.agent.environment import (
    EpisodeStats,
    RolloutBatch,
    RolloutConfig,
    SearchCall,
    assemble_batch,
    observation_ids,
    prompt_ids,
)
from zerosearch_jax.agent.rollout import rollout
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
    "RolloutConfig", "SearchCall", "assemble_batch", "environment", "episode", "information_block",
    "observation_ids", "parse_action", "policy_prompt", "prompt_ids", "rollout", "warmup",
]
