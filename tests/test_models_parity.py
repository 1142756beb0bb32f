"""Logit parity with Hugging Face PyTorch (float32) and the save_pretrained round trip."""

import numpy as np
import pytest
import torch

from tests.hf_utils import hf_logits, left_padded_batch, tiny_hf_model
from zerosearch_jax import models

TOL = 1e-4

FAMILIES = {
    "llama": {},
    "llama3_rope_tied": dict(
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        rope_theta=500_000.0),
    "qwen2": {},
    "qwen2_tied": dict(tie_word_embeddings=True),
    "qwen3": {},
}


def _family(name):
    return name.split("_")[0].replace("llama3", "llama")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_dir(request, tmp_path_factory):
    name = request.param
    model = tiny_hf_model(_family(name), seed=len(name), **FAMILIES[name])
    out = tmp_path_factory.mktemp(name)
    model.save_pretrained(out)
    return name, model, str(out)


def _masked_max_diff(a, b, mask):
    return float(np.abs(a - b)[np.asarray(mask, bool)].max())


def test_logits_match_hf_without_padding(hf_dir):
    _, model, path = hf_dir
    config, params = models.load_pretrained(path)
    ids, mask = left_padded_batch(config.vocab_size, [17, 17])
    ours = np.asarray(models.forward(config, params, ids))
    assert ours.dtype == np.float32
    assert np.abs(ours - hf_logits(model, ids)).max() <= TOL


def test_logits_match_hf_with_left_padding(hf_dir):
    _, model, path = hf_dir
    config, params = models.load_pretrained(path)
    ids, mask = left_padded_batch(config.vocab_size, [21, 9, 14], seed=1)
    ours = np.asarray(models.forward(config, params, ids, mask))
    assert _masked_max_diff(ours, hf_logits(model, ids, mask), mask) <= TOL


def test_llama3_rope_scaling_matters(tmp_path):
    """Guards the parity test itself: dropping the llama3 scaling must break parity."""
    import dataclasses

    model = tiny_hf_model("llama", **FAMILIES["llama3_rope_tied"])
    model.save_pretrained(tmp_path)
    config, params = models.load_pretrained(str(tmp_path))
    assert config.rope_scaling is not None and config.rope_scaling.rope_type == "llama3"
    ids, _ = left_padded_batch(config.vocab_size, [120], seed=2)
    ref = hf_logits(model, ids)
    assert np.abs(np.asarray(models.forward(config, params, ids)) - ref).max() <= TOL
    unscaled = dataclasses.replace(config, rope_scaling=None)
    diff = np.abs(np.asarray(models.forward(unscaled, params, ids)) - ref).max()
    assert diff > 10 * TOL


def test_save_pretrained_round_trip(hf_dir, tmp_path):
    """Our export loads in transformers with the same logits; sharded exports load back."""
    from transformers import AutoModelForCausalLM

    _, _, path = hf_dir
    config, params = models.load_pretrained(path)
    out = models.save_pretrained(config, params, str(tmp_path / "export"))
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask = left_padded_batch(config.vocab_size, [11, 16], seed=3)
    ours = np.asarray(models.forward(config, params, ids, mask))
    assert _masked_max_diff(ours, hf_logits(reloaded, ids, mask), mask) <= TOL

    sharded = models.save_pretrained(config, params, str(tmp_path / "sharded"),
                                     max_shard_bytes=40_000)
    import os

    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    config2, params2 = models.load_pretrained(sharded)
    assert config2 == config
    np.testing.assert_array_equal(np.asarray(models.forward(config2, params2, ids, mask)), ours)


def test_bfloat16_params_close_to_float32(hf_dir):
    import jax.numpy as jnp

    _, _, path = hf_dir
    config, p32 = models.load_pretrained(path)
    _, p16 = models.load_pretrained(path, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in __import__("jax").tree.leaves(p16))
    ids, _ = left_padded_batch(config.vocab_size, [12], seed=4)
    a = np.asarray(models.forward(config, p32, ids))
    b = np.asarray(models.forward(config, p16, ids))
    assert b.dtype == np.float32
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
