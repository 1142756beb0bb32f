"""ZeroSearch, Qwen-2.5-3B base policy, REINFORCE_PP (estimator `reinforce_pp`; REFERENCE s. 7)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import zerosearch_qwen2_5_3b  # noqa: E402


def get_config():
    return zerosearch_qwen2_5_3b.get_config(estimator="reinforce_pp")
