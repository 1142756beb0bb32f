"""Helpers for comparing against Hugging Face PyTorch models."""

import numpy as np
import torch


def tiny_hf_model(model_type: str, seed: int = 0, **overrides):
    """A randomly initialised tiny transformers model of a supported family."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[model_type]
    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    if model_type == "qwen3":
        kwargs["head_dim"] = 24  # Qwen3 decouples H * D from the hidden size.
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cls(**kwargs), dtype=torch.float32).eval()
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: make them count.
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Logits with the positions HF `generate` uses for padded rows (cumsum of the mask - 1)."""
    ids_t = torch.tensor(np.asarray(ids), dtype=torch.long)
    if mask is None:
        mask = np.ones_like(ids)
    mask_t = torch.tensor(np.asarray(mask), dtype=torch.long)
    pos = (mask_t.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids_t, attention_mask=mask_t, position_ids=pos).logits.numpy()


def left_padded_batch(vocab: int, lengths, seed: int = 0, pad_id: int = 0):
    rng = np.random.default_rng(seed)
    T = max(lengths)
    ids = np.full((len(lengths), T), pad_id, np.int64)
    mask = np.zeros((len(lengths), T), np.int64)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = rng.integers(3, vocab, n)
        mask[i, T - n:] = 1
    return ids, mask
