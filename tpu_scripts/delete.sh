#!/usr/bin/env bash
# Deletes a TPU VM or pod slice (and, with --queued, its queued-resource request).
#
#   bash tpu_scripts/delete.sh --name=NAME --zone=ZONE [--queued] [--yes] [--async]
#
#   --name, --zone, --project as for create.sh
#   --queued           the TPU was created with create.sh --queued: delete the request and,
#                      with it, the TPU (--force)
#   --yes              do not ask for confirmation (gcloud --quiet)
#   --async            return without waiting for the deletion to finish
#   --dry-run          print the gcloud command instead of running it
#   -h, --help         this text
#
# Whatever the run wrote to a local workdir on the workers goes with them; a gs:// workdir stays.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0
EXTRA=()

split_flag_values "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case "$1" in
    --queued) QUEUED=1; shift ;;
    --yes) EXTRA+=(--quiet); shift ;;
    --async) EXTRA+=(--async); shift ;;
    *) common_flag "$@"; shift "$CONSUMED" ;;
  esac
done
require_tpu
scope_flags

if ((QUEUED)); then
  run gcloud compute tpus queued-resources delete "$TPU_NAME" "${SCOPE[@]}" --force "${EXTRA[@]}"
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${SCOPE[@]}" "${EXTRA[@]}"
fi
