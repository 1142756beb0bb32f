"""Weights in and out: Hugging Face safetensors directories and llama.cpp GGUF files.

Both formats are read through one small interface, a *tensor source* that yields tensors under
their Hugging Face names ([out, in] layout, float32 or the stored float dtype), so one function
(`assemble_params`) turns either into this package's parameter layout (see `transformer.py`).
Tensors are read lazily one at a time (safetensors through `safe_open`, GGUF through the
memory-mapped `gguf.GGUFReader`), converted, and placed on device before the next is read, so
loading never holds a second full copy of the model in host memory.

`save_pretrained` writes the reverse: a directory that `transformers.AutoModelForCausalLM`
(and so vLLM / SGLang) loads with the same logits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from zerosearch_jax.models.config import ConfigError, ModelConfig, RopeScaling
from zerosearch_jax.models.hub import WeightsError, resolve_model

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Tensor sources: HF names -> numpy arrays, one tensor at a time.
# ----------------------------------------------------------------------------------------------


class SafetensorsSource:
    """The tensors of a HF model directory (`model.safetensors` or sharded with an index)."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise WeightsError(f"{index}: not a valid safetensors index ({e})") from None
            self._file_of = {k: os.path.join(directory, v) for k, v in weight_map.items()}
        elif os.path.exists(single):
            from safetensors import safe_open

            try:
                with safe_open(single, "np") as f:
                    names = list(f.keys())
            except Exception as e:  # safetensors raises its own error types
                raise WeightsError(f"{single}: not a readable safetensors file ({e})") from None
            self._file_of = dict.fromkeys(names, single)
        else:
            raise WeightsError(
                f"{directory}: no model.safetensors or model.safetensors.index.json found")
        for path in set(self._file_of.values()):
            if not os.path.exists(path):
                raise WeightsError(f"{path}: shard listed in the index is missing")
        self._handles: dict[str, Any] = {}

    def names(self) -> set[str]:
        return set(self._file_of)

    def where(self, name: str) -> str:
        return self._file_of.get(name, self.directory)

    def get(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        path = self._file_of[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, "np")
        return self._handles[path].get_tensor(name)


# Quantization types whose dequantization (by the `gguf` package, llama.cpp's own reference
# code) is tested here. Anything else is refused with a clear error rather than guessed at.
GGUF_SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _unpermute_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's interleaving of Q/K rows (its converter permutes them for llama)."""
    d0 = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, d0 // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    """The tensors of a GGUF file, dequantized to float32, under HF names."""

    def __init__(self, path: str):
        import gguf

        self.path = path
        if not os.path.exists(path):
            raise WeightsError(f"{path}: file not found")
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:  # gguf raises ValueError / struct.error on bad files
            raise WeightsError(f"{path}: not a readable GGUF file ({e})") from None
        self.arch = self.field("general.architecture")
        self._tensors = {}
        for t in self.reader.tensors:
            hf = self._hf_name(t.name)
            if hf is not None:
                self._tensors[hf] = t

    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    @staticmethod
    def _hf_name(name: str) -> str | None:
        if name in _GGUF_GLOBAL_NAMES:
            return _GGUF_GLOBAL_NAMES[name]
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
        if m and m.group(2) in _GGUF_LAYER_NAMES:
            return f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}"
        return None  # e.g. rope_freqs.weight, handled through the config.

    def names(self) -> set[str]:
        return set(self._tensors)

    def where(self, name: str) -> str:
        t = self._tensors.get(name)
        return f"{self.path} (tensor {t.name})" if t is not None else self.path

    def raw_tensor(self, gguf_name: str) -> np.ndarray | None:
        for t in self.reader.tensors:
            if t.name == gguf_name:
                return self._dequantize(t)
        return None

    def _dequantize(self, t) -> np.ndarray:
        import gguf

        qtype = t.tensor_type.name
        if qtype not in GGUF_SUPPORTED_TYPES:
            raise WeightsError(
                f"{self.path}: tensor {t.name} has quantization type {qtype}, which is not "
                f"supported; supported: {', '.join(GGUF_SUPPORTED_TYPES)}")
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml order is reversed
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type),
                          np.float32).reshape(shape)

    def get(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        w = self._dequantize(t)
        if self.arch == "llama":
            if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
                w = _unpermute_llama_cpp(w, int(self.field("llama.attention.head_count")))
            elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
                w = _unpermute_llama_cpp(w, int(self.field("llama.attention.head_count_kv")))
        return w

    def model_config(self) -> ModelConfig:
        """The architecture, read from the GGUF metadata."""
        arch = self.arch
        if arch not in ("llama", "qwen2", "qwen3"):
            raise WeightsError(
                f"{self.path}: unsupported architecture {arch!r}; supported: llama, qwen2, qwen3")

        def req(key):
            v = self.field(f"{arch}.{key}")
            if v is None:
                raise WeightsError(f"{self.path}: metadata key {arch}.{key} is missing")
            return v

        heads = int(req("attention.head_count"))
        hidden = int(req("embedding_length"))
        embed = self._tensors.get("model.embed_tokens.weight")
        if embed is None:
            raise WeightsError(f"{self.path}: tensor token_embd.weight is missing")
        vocab = int(embed.shape[-1])
        eos = self.field("tokenizer.ggml.eos_token_id")
        scaling = None
        freqs = self.raw_tensor("rope_freqs.weight")
        if freqs is not None:
            scaling = RopeScaling(
                rope_type="llama3",
                factor=float(self.field(f"{arch}.rope.scaling.factor", 8.0)),
                original_max_position_embeddings=int(
                    self.field(f"{arch}.rope.scaling.original_context_length", 8192)))
        try:
            config = ModelConfig(
                model_type=arch, vocab_size=vocab, hidden_size=hidden,
                intermediate_size=int(req("feed_forward_length")),
                num_layers=int(req("block_count")), num_heads=heads,
                num_kv_heads=int(self.field(f"{arch}.attention.head_count_kv", heads)),
                head_dim=int(self.field(f"{arch}.attention.key_length", hidden // heads)),
                rms_norm_eps=float(req("attention.layer_norm_rms_epsilon")),
                rope_theta=float(self.field(f"{arch}.rope.freq_base", 10_000.0)),
                rope_scaling=scaling, qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3",
                tie_word_embeddings="lm_head.weight" not in self._tensors,
                max_position_embeddings=int(self.field(f"{arch}.context_length", 4096)),
                bos_token_id=self.field("tokenizer.ggml.bos_token_id"),
                eos_token_ids=() if eos is None else (int(eos),),
                pad_token_id=self.field("tokenizer.ggml.padding_token_id"))
        except ConfigError as e:
            raise WeightsError(f"{self.path}: {e}") from None
        if freqs is not None:
            # llama.cpp stores llama3 scaling as per-frequency divisors; check ours agrees.
            base = dataclasses.replace(config, rope_scaling=None).rope_inv_freq()
            if not np.allclose(base / freqs, config.rope_inv_freq(), rtol=1e-4):
                raise WeightsError(
                    f"{self.path}: rope_freqs.weight does not match llama3 RoPE scaling with "
                    f"factor {scaling.factor}; other RoPE scalings are not supported")
        return config


# ----------------------------------------------------------------------------------------------
# HF tensors <-> this package's parameter layout.
# ----------------------------------------------------------------------------------------------


def _hf_shapes(c: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Expected HF tensor shapes of layer i."""
    E, F, H, K, D = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    p = f"model.layers.{i}."
    shapes = {
        p + "input_layernorm.weight": (E,),
        p + "self_attn.q_proj.weight": (H * D, E),
        p + "self_attn.k_proj.weight": (K * D, E),
        p + "self_attn.v_proj.weight": (K * D, E),
        p + "self_attn.o_proj.weight": (E, H * D),
        p + "post_attention_layernorm.weight": (E,),
        p + "mlp.gate_proj.weight": (F, E),
        p + "mlp.up_proj.weight": (F, E),
        p + "mlp.down_proj.weight": (E, F),
    }
    if c.qkv_bias:
        shapes.update({p + "self_attn.q_proj.bias": (H * D,), p + "self_attn.k_proj.bias": (K * D,),
                       p + "self_attn.v_proj.bias": (K * D,)})
    if c.qk_norm:
        shapes.update({p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)})
    return shapes


def _fuse_qkv(c: ModelConfig, q, k, v):
    """HF q [H*D, ...], k/v [K*D, ...] -> fused [K*(G+2)*D, ...], KV-head-major."""
    K, G, D = c.num_kv_heads, c.num_groups, c.head_dim
    rest = q.shape[1:]
    return np.concatenate([q.reshape(K, G, D, *rest), k.reshape(K, 1, D, *rest),
                           v.reshape(K, 1, D, *rest)], axis=1).reshape(-1, *rest)


def _unfuse_qkv(c: ModelConfig, qkv):
    """The inverse of `_fuse_qkv`: (q [H*D, ...], k [K*D, ...], v [K*D, ...])."""
    K, G, D = c.num_kv_heads, c.num_groups, c.head_dim
    rest = qkv.shape[1:]
    x = qkv.reshape(K, G + 2, D, *rest)
    return (x[:, :G].reshape(K * G * D, *rest), x[:, G].reshape(K * D, *rest),
            x[:, G + 1].reshape(K * D, *rest))


def _assemble_layer(c: ModelConfig, i: int, read, place) -> dict[str, Any]:
    shapes = _hf_shapes(c, i)
    prefix = f"model.layers.{i}."

    def r(name):
        return read(prefix + name, shapes[prefix + name])

    def put(path, x):
        return place((f"layer_{i}", *path), x)

    E, F = c.hidden_size, c.intermediate_size
    attn = {
        "qkv_weight": put(("attn", "qkv_weight"), _fuse_qkv(
            c, r("self_attn.q_proj.weight"), r("self_attn.k_proj.weight"),
            r("self_attn.v_proj.weight"))),
        "o_weight": put(("attn", "o_weight"), r("self_attn.o_proj.weight")),
    }
    if c.qkv_bias:
        attn["qkv_bias"] = put(("attn", "qkv_bias"), _fuse_qkv(
            c, r("self_attn.q_proj.bias"), r("self_attn.k_proj.bias"), r("self_attn.v_proj.bias")))
    if c.qk_norm:
        attn["q_norm"] = {"scale": put(("attn", "q_norm", "scale"), r("self_attn.q_norm.weight"))}
        attn["k_norm"] = {"scale": put(("attn", "k_norm", "scale"), r("self_attn.k_norm.weight"))}
    return {
        "pre_attn_norm": {"scale": put(("pre_attn_norm", "scale"), r("input_layernorm.weight"))},
        "attn": attn,
        "pre_mlp_norm": {"scale": put(("pre_mlp_norm", "scale"),
                                      r("post_attention_layernorm.weight"))},
        "mlp": {
            "gate_up": put(("mlp", "gate_up"), np.stack(
                [r("mlp.gate_proj.weight"), r("mlp.up_proj.weight")], axis=1).reshape(2 * F, E)),
            "down": put(("mlp", "down"), r("mlp.down_proj.weight")),
        },
    }


def assemble_params(config: ModelConfig, source, dtype=jnp.float32,
                    place: Callable[[tuple[str, ...], np.ndarray], jax.Array] | None = None):
    """Builds the parameter pytree from a tensor source (HF names), one tensor at a time.

    `place(path, array)` puts each converted array on device (default: `jnp.asarray` in
    `dtype`); pass one that calls `jax.device_put` with a sharding to load straight onto a mesh.
    """
    c = config
    where = getattr(source, "where", lambda n: str(n))
    names = source.names()
    dtype = jnp.dtype(dtype)
    place = place or (lambda path, x: jnp.asarray(x, dtype))

    def read(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in names:
            raise WeightsError(f"{where(name)}: tensor {name} is missing")
        x = source.get(name)
        if tuple(x.shape) != shape:
            raise WeightsError(
                f"{where(name)}: tensor {name} has shape {tuple(x.shape)} but the config "
                f"({c.model_type}, hidden={c.hidden_size}, heads={c.num_heads}/{c.num_kv_heads}, "
                f"head_dim={c.head_dim}, vocab={c.vocab_size}) expects {shape}")
        return x

    # A file with more layers than the config is as wrong as one with fewer.
    layer_ids = {int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    if layer_ids and max(layer_ids) >= c.num_layers:
        raise WeightsError(
            f"{where('model.layers')}: has layer {max(layer_ids)} but the config has "
            f"num_layers={c.num_layers}")

    E, V = c.hidden_size, c.vocab_size
    params: dict[str, Any] = {
        "embedder": {"embedding": place(("embedder", "embedding"),
                                        read("model.embed_tokens.weight", (V, E)))},
        "final_norm": {"scale": place(("final_norm", "scale"),
                                      read("model.norm.weight", (E,)))},
    }
    if not c.tie_word_embeddings:
        params["lm_head"] = {"weight": place(("lm_head", "weight"),
                                             read("lm_head.weight", (V, E)))}
    for i in range(c.num_layers):
        params[f"layer_{i}"] = _assemble_layer(c, i, read, place)
    return params


def hf_tensors(config: ModelConfig, params) -> Iterator[tuple[str, np.ndarray]]:
    """The inverse of `assemble_params`: (HF name, numpy array) pairs, one at a time."""
    c = config
    host = lambda x: np.asarray(jax.device_get(x))  # noqa: E731
    yield "model.embed_tokens.weight", host(params["embedder"]["embedding"])
    for i in range(c.num_layers):
        lp = params[f"layer_{i}"]
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", host(lp["pre_attn_norm"]["scale"])
        q, k, v = _unfuse_qkv(c, host(lp["attn"]["qkv_weight"]))
        yield p + "self_attn.q_proj.weight", q
        yield p + "self_attn.k_proj.weight", k
        yield p + "self_attn.v_proj.weight", v
        if c.qkv_bias:
            q, k, v = _unfuse_qkv(c, host(lp["attn"]["qkv_bias"]))
            yield p + "self_attn.q_proj.bias", q
            yield p + "self_attn.k_proj.bias", k
            yield p + "self_attn.v_proj.bias", v
        if c.qk_norm:
            yield p + "self_attn.q_norm.weight", host(lp["attn"]["q_norm"]["scale"])
            yield p + "self_attn.k_norm.weight", host(lp["attn"]["k_norm"]["scale"])
        yield p + "self_attn.o_proj.weight", host(lp["attn"]["o_weight"])
        yield p + "post_attention_layernorm.weight", host(lp["pre_mlp_norm"]["scale"])
        gu = host(lp["mlp"]["gate_up"]).reshape(c.intermediate_size, 2, c.hidden_size)
        yield p + "mlp.gate_proj.weight", gu[:, 0]
        yield p + "mlp.up_proj.weight", gu[:, 1]
        yield p + "mlp.down_proj.weight", host(lp["mlp"]["down"])
    yield "model.norm.weight", host(params["final_norm"]["scale"])
    if not c.tie_word_embeddings:
        yield "lm_head.weight", host(params["lm_head"]["weight"])


# ----------------------------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------------------------


def read_hf_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise WeightsError(f"{path}: file not found (a Hugging Face model directory needs it)")
    try:
        with open(path) as f:
            d = json.load(f)
    except ValueError as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    return ModelConfig.from_hf_dict(d, source=path)


def load_pretrained(path: str, dtype=jnp.float32, *, place=None) -> tuple[ModelConfig, Any]:
    """Loads (config, params) from a HF directory, a `.gguf` file, or a known model name.

    path: a directory with config.json + safetensors (single or sharded), a `.gguf` file
      (F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q4_K/Q6_K, dequantized), an embedded model name such as
      `smollm2-135m-instruct`, or a Hugging Face hub id (needs network access).
    dtype: parameter dtype (float32 or bfloat16).
    place: optional `place(path, np_array) -> jax.Array` to shard while loading.
    """
    resolved = resolve_model(path)
    if resolved.endswith(".gguf"):
        source = GGUFSource(resolved)
        config = source.model_config()
    else:
        config = read_hf_config(resolved)
        source = SafetensorsSource(resolved)
    params = assemble_params(config, source, dtype, place)
    logger.debug("loaded %s (%s, %d layers) in %s", resolved, config.model_type,
                config.num_layers, jnp.dtype(dtype).name)
    return config, params


def save_pretrained(config: ModelConfig, params, out_dir: str, tokenizer=None,
                    max_shard_bytes: int = 5 * 2**30) -> str:
    """Writes a HF model directory: config.json, safetensors (sharded past `max_shard_bytes`,
    with an index), generation_config.json, and the tokenizer when given.

    Files are written under temporary names and renamed at the end, so an interrupted export
    never leaves a directory that looks complete.
    """
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    dtype_name = "float32"
    for name, x in hf_tensors(config, params):
        dtype_name = "bfloat16" if x.dtype == jnp.bfloat16 else str(x.dtype)
        if size and size + x.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = np.ascontiguousarray(x)
        size += x.nbytes
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    pending = []
    for fname, shard in zip(files, shards, strict=True):
        tmp = os.path.join(out_dir, fname + ".tmp")
        save_file(shard, tmp, metadata={"format": "pt"})
        pending.append((tmp, os.path.join(out_dir, fname)))
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = dtype_name
    texts = {"config.json": hf_config,
             "generation_config.json": {"bos_token_id": config.bos_token_id,
                                        "eos_token_id": hf_config["eos_token_id"],
                                        "pad_token_id": config.pad_token_id}}
    if len(shards) > 1:
        texts["model.safetensors.index.json"] = {
            "metadata": {"total_size": int(sum(x.nbytes for s in shards for x in s.values()))},
            "weight_map": {n: f for f, s in zip(files, shards, strict=True) for n in s}}
    for fname, obj in texts.items():
        tmp = os.path.join(out_dir, fname + ".tmp")
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
        pending.append((tmp, os.path.join(out_dir, fname)))
    for tmp, final in pending:
        os.replace(tmp, final)
    if tokenizer is not None:
        getattr(tokenizer, "hf", tokenizer).save_pretrained(out_dir)
    return out_dir


def is_exported(hf_dir: str) -> bool:
    """Whether `hf_dir` holds a complete `save_pretrained` export: it renames its files into
    place last, so config.json plus weights mean a complete one (a stage's cache)."""
    return os.path.isdir(hf_dir) and os.path.exists(os.path.join(hf_dir, "config.json")) and any(
        name.endswith(".safetensors") for name in os.listdir(hf_dir))
