#!/usr/bin/env bash
# Starts training on every worker of a TPU (in the background, with nohup).
#
#   bash tpu_scripts/launch.sh --name=NAME --zone=ZONE --config=configs/X.py --workdir=DIR \
#       [--config.KEY=VALUE ...] [-- --config.KEY=VALUE ...]
#
#   --name, --zone, --project as for create.sh
#   --config FILE      config file, relative to the repository root (required)
#   --workdir DIR      run directory (required): a gs:// path, or an absolute path on the
#                      workers (on a pod slice, a directory all workers share)
#   --config.KEY=VALUE trainer overrides, passed to every worker exactly as given
#   --distributed      pass --distributed to the trainer: jax.distributed.initialize() with
#                      the slice detected from the TPU metadata (use it on pod slices)
#   --env KEY=VALUE    environment variable for the trainer (repeatable), e.g. HF_TOKEN=...
#   --worker WORKERS   all (default); a pod slice needs every worker to run
#   --dry-run          print the gcloud command instead of running it
#   -h, --help         this text
#
# Every worker runs the same command (JAX's multi-controller model):
#   cd ~/zerosearch-jax && nohup .venv/bin/python -m zerosearch_jax.train --config=... \
#       [overrides] --workdir=... > logs/train.log 2>&1 &
# Its log is ~/zerosearch-jax/logs/train.log on that worker (logs.sh shows it) and its process
# id goes to logs/train.pid (stop.sh uses it). A worker already running training refuses to
# start a second one. Re-launching with the same workdir resumes from its latest checkpoint.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG=""
WORKDIR=""
WORKER=all
OVERRIDES=()
ENVS=()
DISTRIBUTED=()

split_flag_values "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case "$1" in
    --config) CONFIG=$(flag_value "$@"); shift 2 ;;
    --workdir) WORKDIR=$(flag_value "$@"); shift 2 ;;
    --worker) WORKER=$(flag_value "$@"); shift 2 ;;
    --env) ENVS+=("$(flag_value "$@")"); shift 2 ;;
    --distributed) DISTRIBUTED=(--distributed); shift ;;
    --config.*) OVERRIDES+=("$1"); shift ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    *) common_flag "$@"; shift "$CONSUMED" ;;
  esac
done

require_tpu
require "$CONFIG" --config configs/zerosearch_qwen2_5_3b.py
require "$WORKDIR" --workdir gs://my-bucket/runs/qwen2_5_3b
check_worker "$WORKER"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ $CONFIG != /* ]] || die "--config=$CONFIG: give the path relative to the repository root (e.g. configs/default.py): the workers have their own copy"
[[ -f $REPO_ROOT/$CONFIG ]] || die "--config=$CONFIG: no such file in $REPO_ROOT (e.g. configs/default.py)"
[[ $WORKDIR == gs://?* || $WORKDIR == /* ]] ||
  die "--workdir=$WORKDIR: expected a gs:// path or an absolute path on the workers (setup.sh replaces ~/$REMOTE_DIR)"
for override in "${OVERRIDES[@]}"; do
  [[ $override == --config.?*=* ]] || die "override '$override': expected --config.KEY=VALUE"
done
for kv in "${ENVS[@]}"; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env $kv: expected KEY=VALUE"
done
scope_flags

# The trainer's argv, each word quoted for the worker's shell, so overrides with spaces, quotes
# or $ reach Python exactly as typed here.
TRAIN=(.venv/bin/python -m zerosearch_jax.train --config="$CONFIG" "${OVERRIDES[@]}"
  --workdir="$WORKDIR" "${DISTRIBUTED[@]}")
TRAIN_LINE="env PYTHONUNBUFFERED=1"
for kv in "${ENVS[@]}"; do TRAIN_LINE+=" $(shell_quote "$kv")"; done
TRAIN_LINE+=" $(quote_command "${TRAIN[@]}")"

LAUNCH="set -e; cd ~/$REMOTE_DIR; mkdir -p logs; \
if [ -f $REMOTE_PID ] && kill -0 \"\$(cat $REMOTE_PID)\" 2>/dev/null; then \
echo \"\$(hostname): training already running (pid \$(cat $REMOTE_PID)); stop it first\" >&2; exit 1; fi; \
nohup $TRAIN_LINE > $REMOTE_LOG 2>&1 < /dev/null & \
echo \$! > $REMOTE_PID; echo \"\$(hostname): started pid \$!, log ~/$REMOTE_DIR/$REMOTE_LOG\""
remote_ssh "$WORKER" "$LAUNCH"
