#!/usr/bin/env bash
# The accelerator checks of the rollout-engine issue in one call of the device tool: for each
# shape (SmolLM2-135M, a random-weight Qwen2.5-3B), `decode.py` (step time against the HBM
# floor, random weights) and `rollout.py` (the default job's rollout shapes: the scripted
# policy that searches, a random-weight simulator writing every page to its cap; the host
# loop and the in-graph engine, their ratio and the share of plain decoding). About 10
# minutes on one H100 by estimate (not yet run on one).
#
# Here, once (the accelerator machine has no model hub, so the tokenizer travels):
#   echo /.devcarry/ >> .git/info/exclude
#   .venv/bin/python -c "from zerosearch_jax.tokenizer import Tokenizer; \
#       Tokenizer.from_pretrained('smollm2-135m-instruct').save_pretrained('.devcarry/tokenizer')"
# Then one device call: command `bash benchmarks/device_checks.sh`, carry [".devcarry"],
# timeout_s 600. Figures land in $OUT: decode_<shape>.json, rollout_<shape>.json and the log.
# Overrides: SHAPES, BATCHES, REPEATS, ENGINES, TOKENIZER, JAX_PLATFORMS, PYTHON
# (the tests run SHAPES=tiny JAX_PLATFORMS=cpu on this script).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_checks}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
PY=${PYTHON:-python3}
SHAPES=${SHAPES:-"smollm2-135m qwen2.5-3b"}
BATCHES=${BATCHES:-"1 8 16 32"}
REPEATS=${REPEATS:-3}
ENGINES=${ENGINES:-host,in_graph}
TOKENIZER=${TOKENIZER:-.devcarry/tokenizer}
exec > >(tee "$OUT/device_checks.log") 2>&1

status=0
run() {
    echo "+ $*"
    "$@" || { echo "FAILED (exit $?): $*"; status=1; }
}
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
run "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
for shape in $SHAPES; do
    # shellcheck disable=SC2086  # BATCHES is a list
    run "$PY" benchmarks/decode.py --model "random:$shape" --no-hf --batches $BATCHES \
        --repeats "$REPEATS" --json "$OUT/decode_$shape.json"
    run "$PY" benchmarks/rollout.py --policy "scripted:$shape" --simulator "random:$shape" \
        --tokenizer "$TOKENIZER" --engines "$ENGINES" --repeats "$REPEATS" \
        --json "$OUT/rollout_$shape.json"
done
echo "device_checks: exit $status"
exit $status
