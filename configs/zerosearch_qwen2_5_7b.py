"""ZeroSearch, Qwen-2.5-7B base policy, REINFORCE, curriculum 0 -> 0.75 (REFERENCE s. 4, 7)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import zerosearch_qwen2_5_3b  # noqa: E402


def get_config():
    return zerosearch_qwen2_5_3b.get_config(policy="Qwen/Qwen2.5-7B", noise_start=0.0,
                                            noise_end=0.75)
