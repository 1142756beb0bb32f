"""The real embedded model, SmolLM2-135M-Instruct (GGUF Q4_1/Q8_0), loaded both ways."""

import os

import numpy as np

from tests.hf_utils import hf_logits
from zerosearch_jax import models

TOL = 1e-4


def _prompts(tokenizer):
    texts = ["What is the capital of France?", "Who wrote Hamlet? Answer briefly please."]
    seqs = [tokenizer.encode(tokenizer.chat_prompt(t)) for t in texts]
    ids, mask = tokenizer.pad_batch(seqs)
    return ids, mask


def test_gguf_logits_match_transformers(smollm2, smollm2_torch, smollm2_tokenizer):
    """Against transformers' float32 load of the same file, and against a float64 run of it.

    Over 30 layers with logits up to ~38, float32 rounding alone moves logits by ~1e-4: here
    transformers' own float32 result is ~9e-5 from the float64 truth. So the check is that we
    are as close to the truth as transformers itself is (within 2x), and within 2e-4 of it.
    """
    import copy

    import torch

    config, params = smollm2
    assert (config.num_layers, config.hidden_size, config.num_kv_heads) == (30, 576, 3)
    assert config.tie_word_embeddings and config.rope_theta == 100_000.0
    ids, mask = _prompts(smollm2_tokenizer)
    ours = np.asarray(models.forward(config, params, ids, mask))
    ref = hf_logits(smollm2_torch, ids, mask)
    ref64 = hf_logits(copy.deepcopy(smollm2_torch).to(torch.float64), ids, mask)
    m = mask.astype(bool)
    hf_error = np.abs(ref - ref64)[m].max()
    assert np.abs(ours - ref64)[m].max() <= 2 * hf_error
    assert np.abs(ours - ref)[m].max() <= 2 * TOL


def test_hf_directory_of_the_same_model_matches(smollm2, smollm2_torch, smollm2_tokenizer,
                                               tmp_path):
    """The GGUF model exported by transformers to a HF directory loads to the same logits."""
    import json

    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in smollm2_torch.state_dict().items()
             if k != "lm_head.weight"}
    save_file(state, os.path.join(tmp_path, "model.safetensors"), metadata={"format": "pt"})
    hf_config = smollm2_torch.config.to_dict()
    hf_config.pop("quantization_config", None)
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        json.dump(hf_config, f)
    config, params = models.load_pretrained(str(tmp_path))
    ids, mask = _prompts(smollm2_tokenizer)
    ours = np.asarray(models.forward(config, params, ids, mask))
    gguf_config, gguf_params = smollm2
    m = mask.astype(bool)
    assert np.abs(ours - hf_logits(smollm2_torch, ids, mask))[m].max() <= 2 * TOL
    # Same weights, same program: identical to the GGUF load.
    np.testing.assert_array_equal(ours, np.asarray(models.forward(gguf_config, gguf_params, ids,
                                                                 mask)))


def test_greedy_next_token_is_paris(smollm2, smollm2_tokenizer):
    config, params = smollm2
    tok = smollm2_tokenizer
    ids = tok.encode(tok.chat_prompt("What is the capital of France?"))
    out = list(ids)
    for _ in range(8):
        logits = models.forward(config, params, np.array([out]))
        out.append(int(np.argmax(np.asarray(logits)[0, -1])))
    assert "Paris" in tok.decode(out[len(ids):])

