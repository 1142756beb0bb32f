"""Architecture description of the decoder family: one frozen, hashable `ModelConfig`.

The config is static (it is passed to `jax.jit` as a static argument and closed over by the
Flax module); parameters live in a separate pytree. `from_hf_dict` / `to_hf_dict` translate
Hugging Face `config.json` files of the supported families:

| family          | HF `model_type` | differences handled here                        |
|-----------------|-----------------|-------------------------------------------------|
| Llama 3.x / 3.2 | llama           | llama3 RoPE frequency scaling, untied/tied head |
| SmolLM2         | llama           | tied embeddings                                 |
| Qwen2 / Qwen2.5 | qwen2           | biases on q/k/v projections                     |
| Qwen3           | qwen3           | RMSNorm on q and k per head, explicit head_dim  |
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


class ConfigError(ValueError):
    """A model configuration that cannot describe a supported model."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (`rope_scaling` / `rope_parameters` in HF configs).

    `rope_type="llama3"` is Llama 3.1/3.2's piecewise scaling: long wavelengths are divided by
    `factor`, short ones kept, and the band between smoothly interpolated. `"linear"` divides
    every frequency by `factor` (position interpolation).
    """

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("llama3", "linear"):
            raise ConfigError(
                f"rope scaling type {self.rope_type!r} is not supported; use 'llama3' or 'linear'"
            )
        if self.factor <= 0:
            raise ConfigError(f"rope scaling factor must be > 0, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer: GQA attention, RoPE, RMSNorm, SwiGLU MLP."""

    model_type: str  # "llama" | "qwen2" | "qwen3": the HF family, used for export.
    vocab_size: int  # V: rows of the embedding table (and of the LM head).
    hidden_size: int  # E: width of the residual stream.
    intermediate_size: int  # F: width of the SwiGLU hidden layer.
    num_layers: int  # L: decoder blocks.
    num_heads: int  # H: query heads.
    num_kv_heads: int  # K: key/value heads (GQA); H must be a multiple of K.
    head_dim: int  # D: per-head width (H * D need not equal E, e.g. Qwen3).
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False  # Qwen2: bias on the q/k/v projections.
    qk_norm: bool = False  # Qwen3: RMSNorm over D on every query and key head before RoPE.
    tie_word_embeddings: bool = False  # LM head reuses the embedding table (SmolLM2, small Qwen).
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def num_groups(self) -> int:
        """G = H / K: query heads that share one key/value head."""
        return self.num_heads // self.num_kv_heads

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse RoPE frequencies, [D/2] float64, scaling applied (matches HF exactly)."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float64) / d))
        s = self.rope_scaling
        if s is None:
            return inv
        if s.rope_type == "linear":
            return inv / s.factor
        # llama3: transformers.modeling_rope_utils._compute_llama3_parameters.
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(is_medium, smoothed, scaled)

    # ------------------------------------------------------------------------------------------
    # Hugging Face config.json <-> ModelConfig
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], source: str = "config") -> ModelConfig:
        """Builds a config from a HF `config.json` dict; `source` names the file in errors."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = d.get("architectures")
            raise ConfigError(
                f"{source}: unsupported architecture model_type={model_type!r} "
                f"(architectures={archs}); supported model types: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            head_dim = d.get("head_dim") or hidden // heads
            # transformers 5 moved rope_theta/rope_scaling into `rope_parameters`.
            rope = dict(d.get("rope_parameters") or {})
            legacy = d.get("rope_scaling") or {}
            rope_theta = float(rope.get("rope_theta", d.get("rope_theta", 10_000.0)))
            scaling_dict = {**legacy, **rope}
            rope_type = scaling_dict.get("rope_type", scaling_dict.get("type", "default"))
            scaling = None
            if rope_type not in (None, "default"):
                scaling = RopeScaling(
                    rope_type=rope_type,
                    factor=float(scaling_dict.get("factor", 1.0)),
                    low_freq_factor=float(scaling_dict.get("low_freq_factor", 1.0)),
                    high_freq_factor=float(scaling_dict.get("high_freq_factor", 4.0)),
                    original_max_position_embeddings=int(
                        scaling_dict.get("original_max_position_embeddings", 8192)
                    ),
                )
            eos = d.get("eos_token_id")
            eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos])
                            if e is not None)
            if model_type == "qwen2" and d.get("use_sliding_window"):
                raise ConfigError(f"{source}: sliding-window attention is not supported")
            return cls(
                model_type=model_type,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                qkv_bias=model_type == "qwen2" or bool(d.get("attention_bias", False)),
                qk_norm=model_type == "qwen3",
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
                pad_token_id=d.get("pad_token_id"),
            )
        except KeyError as e:
            raise ConfigError(f"{source}: required key {e.args[0]!r} is missing") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise ConfigError(f"{source}: {e}") from None
            raise ConfigError(f"{source}: bad value: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` that `transformers.AutoConfig` reads back into this architecture."""
        rope_parameters: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope_parameters.update(dataclasses.asdict(self.rope_scaling))
        d: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            # Both spellings, so transformers 4.x (rope_theta/rope_scaling) and 5.x
            # (rope_parameters) read the same RoPE.
            "rope_theta": self.rope_theta,
            "rope_parameters": rope_parameters,
            "rope_scaling": rope_parameters if self.rope_scaling is not None else None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) > 1
                             else (self.eos_token_ids[0] if self.eos_token_ids else None)),
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.qkv_bias
            d["mlp_bias"] = False
        if self.model_type == "qwen2":
            d["use_sliding_window"] = False
        return d


def tiny_config(model_type: str = "llama", **overrides) -> ModelConfig:
    """A few-layer config for tests and examples (random init)."""
    base = dict(
        model_type=model_type, vocab_size=256, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
        rope_theta=10_000.0, qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
        max_position_embeddings=512, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0,
    )
    base.update(overrides)
    return ModelConfig(**base)
