"""ZeroSearch, Qwen-2.5-7B base policy, REINFORCE, curriculum 0 -> 0.75 (docs/method.md §4, §7)."""

from configs import zerosearch_qwen2_5_3b


def get_config():
    return zerosearch_qwen2_5_3b.get_config(policy="Qwen/Qwen2.5-7B", noise_start=0.0,
                                            noise_end=0.75)
