"""ZeroSearch, LLaMA-3.2-3B base policy, REINFORCE, curriculum 0.25 -> 0.5.

The paper's settings: docs/method.md §4 (curriculum), §7 (algorithm).
"""

from configs import zerosearch_qwen2_5_3b


def get_config():
    return zerosearch_qwen2_5_3b.get_config(policy="meta-llama/Llama-3.2-3B", noise_start=0.25,
                                            noise_end=0.5)
