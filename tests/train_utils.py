"""A tiny policy with the real SmolLM2 tokenizer, for fast end-to-end training tests."""

import os

from zerosearch_jax import models


def tiny_policy_dir(path, tokenizer, seed=0) -> str:
    """Writes a 2-layer random Llama over the SmolLM2 vocabulary (with its tokenizer)."""
    config = models.tiny_config("llama", vocab_size=len(tokenizer.hf), hidden_size=32,
                                intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                head_dim=8, tie_word_embeddings=True, bos_token_id=1,
                                eos_token_ids=(2,), pad_token_id=2)
    out = os.path.join(str(path), "tiny_policy")
    models.save_pretrained(config, models.init_params(config, seed), out, tokenizer=tokenizer)
    return out


def tiny_run_flags(policy_dir, workdir, steps=4, **overrides):
    flags = {
        "policy": policy_dir, "simulator.model": policy_dir, "simulator.tune": False,
        "warmup.steps": 0,
        "param_dtype": "float32",
        "compute_dtype": "float32",
        "total_steps": steps, "prompts_per_step": 2, "rollout.samples_per_prompt": 2,
        "rollout.max_turns": 1, "rollout.max_new_tokens": 12, "rollout.max_obs_tokens": 64,
        "simulator.max_new_tokens": 16, "algorithm.micro_batch_size": 2,
        "validation.every": 1000, "data.validation_size": 2, "checkpoint.every": 2,
        "optim.lr": 1e-3, "remat": False,
    }
    flags.update(overrides)
    return ["--config=configs/default.py", f"--workdir={workdir}"] + [
        f"--config.{k}={v}" for k, v in flags.items()]
