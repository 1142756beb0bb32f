"""ZeroSearch, Qwen-2.5-3B base policy, PPO (estimator `gae`; docs/method.md §7)."""

from configs import zerosearch_qwen2_5_3b


def get_config():
    return zerosearch_qwen2_5_3b.get_config(estimator="gae")
