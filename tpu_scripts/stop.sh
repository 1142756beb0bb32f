#!/usr/bin/env bash
# Stops training on the workers of a TPU: SIGTERM, so that the trainer saves a checkpoint at
# the end of its current step and exits; SIGKILL only with --force, after --timeout.
#
#   bash tpu_scripts/stop.sh --name=NAME --zone=ZONE [--timeout=SECONDS] [--force]
#
#   --name, --zone, --project as for create.sh
#   --timeout SECONDS  how long to wait for the checkpoint and exit (default 900; a step of a
#                      large model with its checkpoint can take minutes)
#   --force            SIGKILL what is still running after the timeout (its current step,
#                      back to the last checkpoint, is lost)
#   --worker WORKERS   all (default); on a pod slice stop every worker together
#   --dry-run          print the gcloud command instead of running it
#   -h, --help         this text
#
# The process is the one launch.sh recorded in ~/zerosearch-jax/logs/train.pid on each worker.
# A later launch.sh with the same workdir resumes from the checkpoint.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TIMEOUT=900
FORCE=0
WORKER=all

split_flag_values "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case "$1" in
    --timeout) TIMEOUT=$(flag_value "$@"); shift 2 ;;
    --force) FORCE=1; shift ;;
    --worker) WORKER=$(flag_value "$@"); shift 2 ;;
    *) common_flag "$@"; shift "$CONSUMED" ;;
  esac
done
require_tpu
check_worker "$WORKER"
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout=$TIMEOUT: expected seconds, e.g. --timeout=600"
scope_flags

if ((FORCE)); then
  LATE="kill -KILL \"\$pid\"; echo \"\$h: SIGKILL sent to \$pid after ${TIMEOUT}s\""
else
  LATE="echo \"\$h: pid \$pid still running after ${TIMEOUT}s; wait, or re-run with --force\" >&2; exit 1"
fi
STOP="h=\$(hostname); cd ~/$REMOTE_DIR 2>/dev/null && pid=\$(cat $REMOTE_PID 2>/dev/null) || pid=; \
if [ -z \"\$pid\" ] || ! kill -0 \"\$pid\" 2>/dev/null; then echo \"\$h: no training running\"; exit 0; fi; \
kill -TERM \"\$pid\"; echo \"\$h: SIGTERM sent to \$pid; waiting for its checkpoint\"; \
for _ in \$(seq $TIMEOUT); do kill -0 \"\$pid\" 2>/dev/null || { echo \"\$h: stopped\"; exit 0; }; sleep 1; done; \
$LATE"
remote_ssh "$WORKER" "$STOP"
