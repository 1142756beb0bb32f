#!/usr/bin/env bash
# Shows the training log of a TPU worker (or of all of them).
#
#   bash tpu_scripts/logs.sh --name=NAME --zone=ZONE [--worker=0|all] [--lines=N] [--follow]
#
#   --name, --zone, --project as for create.sh
#   --worker WORKERS   0 (default: process 0 logs metrics and the progress bar), a worker
#                      index, a list such as 0,2, or all
#   --lines N          last N lines (default 50)
#   --follow           keep printing new lines (tail -f; Ctrl-C stops)
#   --dry-run          print the gcloud command instead of running it
#   -h, --help         this text
#
# With several workers, each line is prefixed with the worker's host name.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER=0
LINES=50
FOLLOW=0

split_flag_values "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case "$1" in
    --worker) WORKER=$(flag_value "$@"); shift 2 ;;
    --lines) LINES=$(flag_value "$@"); shift 2 ;;
    --follow) FOLLOW=1; shift ;;
    *) common_flag "$@"; shift "$CONSUMED" ;;
  esac
done
require_tpu
check_worker "$WORKER"
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines=$LINES: expected a number of lines, e.g. --lines=200"
scope_flags

TAIL="tail -n $LINES"
((FOLLOW)) && TAIL+=" -F"
TAIL+=" ~/$REMOTE_DIR/$REMOTE_LOG"
if [[ $WORKER =~ ^[0-9]+$ ]]; then
  remote_ssh "$WORKER" "$TAIL"
else
  # Concurrent workers interleave their output; the prefix says whose line it is.
  remote_ssh "$WORKER" "$TAIL 2>&1 | sed -u \"s/^/\$(hostname): /\""
fi
