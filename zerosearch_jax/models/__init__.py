"""The decoder family (Llama 3.x, Qwen2/2.5, Qwen3, SmolLM2) and its weights.

    config, params = load_pretrained("smollm2-135m-instruct", dtype=jnp.bfloat16)
    logits = forward(config, params, input_ids, attention_mask)   # [B, T, V] float32
    save_pretrained(config, params, "out/hf", tokenizer=tok)       # loads in transformers
    logp, entropy = head_logprobs_entropy(hidden, head_weight(config, params), targets)
"""

from zerosearch_jax.models.config import ConfigError, ModelConfig, RopeScaling, tiny_config
from zerosearch_jax.models.head import (
    compact_positions,
    entropy_from_logits,
    head_logprobs_entropy,
    permute,
    shifted_logprobs,
    token_logprobs,
)
from zerosearch_jax.models.hub import DEFAULT_MODEL, EMBEDDED_MODELS, resolve_model
from zerosearch_jax.models.transformer import (
    KVCache,
    Transformer,
    cache_logical_axes,
    causal_attention_mask,
    extend,
    forward,
    head_weight,
    init_cache,
    init_params,
    param_logical_axes,
    param_shapes,
    positions_from_mask,
    project_logits,
)
from zerosearch_jax.models.weights import (
    GGUFSource,
    SafetensorsSource,
    WeightsError,
    assemble_params,
    hf_tensors,
    is_exported,
    load_pretrained,
    read_hf_config,
    save_pretrained,
)

__all__ = [
    "DEFAULT_MODEL", "EMBEDDED_MODELS", "ConfigError", "GGUFSource", "KVCache", "ModelConfig",
    "RopeScaling", "SafetensorsSource", "Transformer", "WeightsError", "assemble_params",
    "cache_logical_axes", "causal_attention_mask", "compact_positions", "entropy_from_logits",
    "extend", "forward", "hf_tensors", "init_cache", "init_params", "is_exported",
    "load_pretrained", "param_logical_axes", "param_shapes", "positions_from_mask",
    "head_logprobs_entropy", "head_weight", "permute", "project_logits", "read_hf_config",
    "resolve_model", "save_pretrained", "shifted_logprobs", "tiny_config", "token_logprobs",
]
