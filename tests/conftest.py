"""Shared fixtures. Tests run on CPU; the real model is the embedded SmolLM2-135M GGUF."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One persistent XLA compilation cache for the session, shared by the xdist workers and the
# training subprocesses they start (they inherit the environment): the end-to-end tests run the
# same tiny programs in many fresh processes, and each would otherwise compile them again
# (about 40% of a tiny run). A cache hit is the same executable, so no result depends on it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parents[1] / ".cache" / "xla-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402


def shared_data_dir() -> Path | None:
    """The developers' real QA data (`../shared/data`), or None: tests using it skip cleanly."""
    env = os.environ.get("ZEROSEARCH_SHARED_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    from zerosearch_jax.models.hub import embedded_model_path

    return embedded_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """(config, float32 params) of the real SmolLM2-135M-Instruct."""
    from zerosearch_jax.models import load_pretrained

    return load_pretrained(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    from zerosearch_jax.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_torch(smollm2_gguf):
    """transformers' own float32 load of the same GGUF: the reference implementation."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf),
        dtype=torch.float32)
    return model.eval()


@pytest.fixture
def stub_server():
    """`start(respond, delay_s=0.0) -> StubServer` (tests/http_stub.py); all shut down after."""
    from http_stub import stub_server_fixture

    yield from stub_server_fixture()
