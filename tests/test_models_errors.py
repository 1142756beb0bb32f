"""Bad model inputs raise errors that name the file and the problem."""

import json

import pytest

from tests.hf_utils import tiny_hf_model
from zerosearch_jax import models
from zerosearch_jax.models import ConfigError, WeightsError


@pytest.fixture
def hf_dir(tmp_path):
    tiny_hf_model("qwen2", seed=1).save_pretrained(tmp_path)
    return tmp_path


def _edit_config(directory, **changes):
    path = directory / "config.json"
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def test_missing_path():
    with pytest.raises(WeightsError, match="no/such/model-dir.*no such file"):
        models.load_pretrained("./no/such/model-dir")


def test_missing_config(tmp_path):
    with pytest.raises(WeightsError, match=r"config\.json: file not found"):
        models.load_pretrained(str(tmp_path))


def test_missing_weights(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no model.safetensors"):
        models.load_pretrained(str(hf_dir))


def test_corrupt_safetensors(hf_dir):
    (hf_dir / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match=r"model\.safetensors: not a readable"):
        models.load_pretrained(str(hf_dir))


def test_unsupported_architecture(hf_dir):
    _edit_config(hf_dir, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConfigError, match=r"config\.json: unsupported architecture.*gpt2"):
        models.load_pretrained(str(hf_dir))


def test_config_disagrees_with_tensors(hf_dir):
    _edit_config(hf_dir, intermediate_size=80)
    with pytest.raises(WeightsError, match=r"model\.safetensors.*mlp\.gate_proj\.weight has shape"
                                           r" \(96, 64\).*expects \(80, 64\)"):
        models.load_pretrained(str(hf_dir))


def test_config_with_fewer_layers_than_the_file(hf_dir):
    _edit_config(hf_dir, num_hidden_layers=1)
    with pytest.raises(WeightsError, match="has layer 1 but the config has num_layers=1"):
        models.load_pretrained(str(hf_dir))


def test_bad_head_counts():
    with pytest.raises(ConfigError, match=r"num_heads \(6\) must be a multiple of num_kv_heads"):
        models.tiny_config(num_heads=6, num_kv_heads=4)


def test_missing_required_key(hf_dir):
    d = json.loads((hf_dir / "config.json").read_text())
    del d["hidden_size"]
    (hf_dir / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="required key 'hidden_size' is missing"):
        models.load_pretrained(str(hf_dir))


def test_unknown_hub_id_is_named():
    with pytest.raises(WeightsError, match="Qwen/NoSuchModel-0B"):
        models.load_pretrained("Qwen/NoSuchModel-0B")


def test_embedded_name_resolves(smollm2_gguf):
    assert models.resolve_model("SmolLM2-135M-Instruct") == smollm2_gguf
