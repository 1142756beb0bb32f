"""GGUF loading: every supported tensor type, llama.cpp's Q/K permutation, and bad files."""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from tests.hf_utils import hf_logits, left_padded_batch, tiny_hf_model
from zerosearch_jax import models
from zerosearch_jax.models import WeightsError

_LAYER = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
          "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
          "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
          "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.weight": "attn_output.weight",
          "post_attention_layernorm.weight": "ffn_norm.weight",
          "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
          "mlp.down_proj.weight": "ffn_down.weight"}


def _permute(w, n_heads):
    """llama.cpp's converter (convert_hf_to_gguf.LlamaModel.permute)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def _k_quant_bytes(shape, qtype, rng):
    """Random but valid K-quant blocks (gguf-py cannot quantize these): fp16 scales set."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = shape[-1] // block
    raw = rng.integers(0, 256, (shape[0], n_blocks, nbytes), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin at the start of the block
        raw[:, :, 0:4] = np.frombuffer(np.array([0.01, 0.005], np.float16).tobytes(), np.uint8)
    else:  # Q6_K: d at the end
        raw[:, :, -2:] = np.frombuffer(np.array([0.01], np.float16).tobytes(), np.uint8)
    return raw.reshape(shape[0], n_blocks * nbytes)


def write_gguf(model, path, qtype=Q.F32, arch=None, skip=(), rng=None):
    """Writes a transformers model as a llama.cpp-style GGUF; 2-D weights in `qtype`."""
    cfg = model.config
    arch = arch or cfg.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_eos_token_id(2)
    written = {}
    for name, t in model.state_dict().items():
        x = t.numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            gname = "output.weight"
        else:
            parts = name.split(".")
            gname = f"blk.{parts[2]}.{_LAYER['.'.join(parts[3:])]}"
            if arch == "llama" and ("q_proj" in name or "k_proj" in name):
                heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
                x = _permute(x, heads)
        if gname in skip:
            continue
        if x.ndim == 2 and qtype != Q.F32:
            if qtype in (Q.Q4_K, Q.Q6_K):
                raw = _k_quant_bytes(x.shape, qtype, rng)
            else:
                raw = gguf.quants.quantize(x, qtype)
            w.add_tensor(gname, raw, raw_shape=raw.shape, raw_dtype=qtype)
            written[name] = (raw, qtype)
        else:
            w.add_tensor(gname, x)
            written[name] = (x, Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_f32_gguf_matches_transformers(model_type, tmp_path):
    """llama GGUFs store Q/K permuted and qwen2 ones do not: both must match exactly."""
    model = tiny_hf_model(model_type, seed=3)
    path = tmp_path / "m.gguf"
    write_gguf(model, path)
    config, params = models.load_pretrained(str(path))
    assert config.model_type == model_type and not config.tie_word_embeddings
    ids, mask = left_padded_batch(config.vocab_size, [13, 6], seed=7)
    ours = np.asarray(models.forward(config, params, ids, mask))
    m = mask.astype(bool)
    assert np.abs(ours - hf_logits(model, ids, mask))[m].max() <= 1e-4


# (type, max abs weight error relative to the tensor's max abs value)
_QUANTIZED = [(Q.F16, 1e-3), (Q.BF16, 1e-2), (Q.Q8_0, 1e-2), (Q.Q4_0, 0.15), (Q.Q4_1, 0.15)]


@pytest.mark.parametrize(("qtype", "rel_tol"), _QUANTIZED, ids=lambda v: getattr(v, "name", ""))
def test_quantized_weights_dequantize_close_to_originals(qtype, rel_tol, tmp_path):
    model = tiny_hf_model("llama", seed=4, tie_word_embeddings=True)
    path = tmp_path / "q.gguf"
    write_gguf(model, path, qtype)
    config, params = models.load_pretrained(str(path))
    assert config.tie_word_embeddings
    reference = dict(model.state_dict())
    for name, ours in models.hf_tensors(config, params):
        ref = reference[name].numpy()
        err = np.abs(ours - ref).max() / np.abs(ref).max()
        assert err <= rel_tol, (name, err)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quant_tensors_are_dequantized_and_unpermuted(qtype, tmp_path):
    model = tiny_hf_model("llama", seed=5, hidden_size=256, intermediate_size=256,
                          num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path / "k.gguf"
    written = write_gguf(model, path, qtype, rng=np.random.default_rng(0))
    config, params = models.load_pretrained(str(path))
    ours = dict(models.hf_tensors(config, params))
    for name, (raw, t) in written.items():
        if t == Q.F32:
            np.testing.assert_array_equal(ours[name], raw)
            continue
        expected = gguf.quants.dequantize(raw, t)
        if "q_proj" in name or "k_proj" in name:  # undo the file's permutation by hand
            heads = config.num_heads if "q_proj" in name else config.num_kv_heads
            d0 = expected.shape[0]
            expected = expected.reshape(heads, d0 // heads // 2, 2, -1).swapaxes(1, 2) \
                .reshape(expected.shape)
        np.testing.assert_array_equal(ours[name], expected)
        assert np.isfinite(expected).all() and np.abs(expected).max() > 0


def test_real_smollm2_gguf_types(smollm2_gguf):
    """The shipped file mixes Q8_0 (embeddings), Q4_1 (matrices) and F32 (norms)."""
    reader = gguf.GGUFReader(smollm2_gguf)
    assert {t.tensor_type.name for t in reader.tensors} == {"Q8_0", "Q4_1", "F32"}


# -- bad input -------------------------------------------------------------------------------


def test_unsupported_quantization_type_names_file_and_type(tmp_path):
    model = tiny_hf_model("llama", seed=6)
    path = tmp_path / "q5.gguf"
    write_gguf(model, path, Q.Q5_0)
    with pytest.raises(WeightsError, match=r"q5\.gguf.*Q5_0.*not supported"):
        models.load_pretrained(str(path))


def test_unsupported_architecture_names_file(tmp_path):
    model = tiny_hf_model("llama", seed=6)
    path = tmp_path / "arch.gguf"
    write_gguf(model, path, arch="gpt2")
    with pytest.raises(WeightsError, match=r"arch\.gguf.*unsupported architecture 'gpt2'"):
        models.load_pretrained(str(path))


def test_missing_tensor_names_it(tmp_path):
    model = tiny_hf_model("llama", seed=6)
    path = tmp_path / "partial.gguf"
    write_gguf(model, path, skip=("blk.1.ffn_up.weight",))
    with pytest.raises(WeightsError, match=r"partial\.gguf.*model\.layers\.1\.mlp\.up_proj"):
        models.load_pretrained(str(path))


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(WeightsError, match=r"junk\.gguf.*not a readable GGUF"):
        models.load_pretrained(str(path))
