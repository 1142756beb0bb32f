"""ZeroSearch, LLaMA-3.2-3B base policy, REINFORCE, curriculum 0.25 -> 0.5 (REFERENCE s. 4, 7)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import zerosearch_qwen2_5_3b  # noqa: E402


def get_config():
    return zerosearch_qwen2_5_3b.get_config(policy="meta-llama/Llama-3.2-3B", noise_start=0.25,
                                            noise_end=0.5)
