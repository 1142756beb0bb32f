#!/usr/bin/env bash
# Creates a Cloud TPU VM or pod slice (all its workers) for training.
#
#   bash tpu_scripts/create.sh --name=NAME --zone=ZONE --accelerator-type=TYPE [options]
#
#   --name NAME               TPU name (default $TPU_NAME)
#   --zone ZONE               e.g. us-central2-b (default $TPU_ZONE)
#   --project PROJECT         default $TPU_PROJECT, else gcloud's configured project
#   --accelerator-type TYPE   v4-8 (one host), v4-32, v5litepod-16, v5p-8, v6e-8, ...
#   --version VERSION         TPU software (runtime) version; default by TPU generation:
#                             v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5,
#                             v5litepod/v5e v2-alpha-tpuv5-lite, v2-v4 tpu-ubuntu2204-base
#   --spot                    Spot VMs (cheaper, can be preempted at any time)
#   --preemptible             preemptible TPU (older tier; not with --queued)
#   --reserved                use reserved capacity
#   --queued                  request through queued resources (waits in a queue for
#                             capacity instead of failing); the request has the TPU's name
#   --dry-run                 print the gcloud command instead of running it
#   -h, --help                this text
#
# After it: setup.sh (copy and install), launch.sh (train), logs.sh, stop.sh, delete.sh.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCELERATOR=""
VERSION=""
SPOT=0
PREEMPTIBLE=0
RESERVED=0
QUEUED=0

split_flag_values "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case "$1" in
    --accelerator-type) ACCELERATOR=$(flag_value "$@"); shift 2 ;;
    --version | --runtime-version) VERSION=$(flag_value "$@"); shift 2 ;;
    --spot) SPOT=1; shift ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --reserved) RESERVED=1; shift ;;
    --queued) QUEUED=1; shift ;;
    *) common_flag "$@"; shift "$CONSUMED" ;;
  esac
done

require_tpu
require "$ACCELERATOR" --accelerator-type v4-8
[[ $ACCELERATOR =~ ^v[0-9]+[a-z]*(pod)?-[0-9]+$ ]] ||
  die "--accelerator-type=$ACCELERATOR: expected <generation>-<cores or chips>, e.g. v4-8, v5litepod-16, v6e-8"
if [[ -z $VERSION ]]; then
  case "$ACCELERATOR" in
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) VERSION=tpu-ubuntu2204-base ;;
    *) die "no default runtime version for --accelerator-type=$ACCELERATOR; give --version (see 'gcloud compute tpus tpu-vm versions list --zone=$ZONE')" ;;
  esac
fi
((SPOT + PREEMPTIBLE + RESERVED <= 1)) || die "--spot, --preemptible and --reserved exclude each other"
((!QUEUED || !PREEMPTIBLE)) || die "--queued takes --spot or --reserved, not --preemptible"

scope_flags
TIER=()
((SPOT)) && TIER=(--spot)
((PREEMPTIBLE)) && TIER=(--preemptible)
((RESERVED)) && TIER=(--reserved)
if ((QUEUED)); then
  run gcloud compute tpus queued-resources create "$TPU_NAME" "${SCOPE[@]}" \
    --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR" --runtime-version="$VERSION" \
    "${TIER[@]}"
  echo "queued; the TPU exists once the request is ACTIVE: gcloud compute tpus queued-resources describe $TPU_NAME --zone=$ZONE" >&2
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${SCOPE[@]}" \
    --accelerator-type="$ACCELERATOR" --version="$VERSION" "${TIER[@]}"
fi
