# shellcheck shell=bash
# shellcheck disable=SC2034  # the variables set here are read by the scripts that source it
# Shared by the tpu_scripts/*.sh scripts (sourced, not run): flag parsing, errors, and the one
# place gcloud is called, so that --dry-run covers every command.
#
# Every script takes --name, --zone and --project (defaults: $TPU_NAME, $TPU_ZONE,
# $TPU_PROJECT; --project may be left to gcloud's own default project), --dry-run and --help.
# Flags may be written --flag=value or --flag value.

TPU_NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
DRY_RUN=0
# Where setup.sh puts the project on every worker, relative to the worker's home directory.
REMOTE_DIR="zerosearch-jax"
REMOTE_LOG="logs/train.log"  # per worker, inside REMOTE_DIR
REMOTE_PID="logs/train.pid"

die() {
  echo "error: $*" >&2
  echo "(see $(basename "$0") --help)" >&2
  exit 2
}

# Prints the script's header comment (from line 2 to the first line that is not a comment).
usage() {
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
}

# flag_value "$@": the value after flag $1, or an error naming the flag.
flag_value() {
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value"
  printf '%s' "$2"
}

# Splits --flag=value into --flag value (into the ARGS array), so each script matches a flag
# one way. Trainer overrides (--config.<key>=<value>) and everything after "--" are kept whole.
split_flag_values() {
  ARGS=()
  while (($#)); do
    case "$1" in
      --) ARGS+=("$@"); return ;;
      --config.*) ARGS+=("$1") ;;
      --*=*) ARGS+=("${1%%=*}" "${1#*=}") ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
}

# Handles a flag every script takes; sets CONSUMED to the number of words it used.
common_flag() {
  CONSUMED=2
  case "$1" in
    --name) TPU_NAME=$(flag_value "$@") ;;
    --zone) ZONE=$(flag_value "$@") ;;
    --project) PROJECT=$(flag_value "$@") ;;
    --dry-run) DRY_RUN=1; CONSUMED=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
}

# require VALUE FLAG EXAMPLE: an error naming the missing flag and what a value looks like.
require() {
  [[ -n $1 ]] || die "$2 is required (e.g. $2=$3)"
}

require_tpu() {
  require "$TPU_NAME" --name my-tpu
  require "$ZONE" --zone us-central2-b
  [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name=$TPU_NAME: TPU names are lowercase letters, digits and '-', starting with a letter"
}

# --zone and (when given) --project, for every gcloud command.
scope_flags() {
  SCOPE=(--zone="$ZONE")
  [[ -z $PROJECT ]] || SCOPE+=(--project="$PROJECT")
}

# The word as a POSIX shell would need it quoted (the rule of Python's shlex.quote).
shell_quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\"\'\"\'}"
  fi
}

# A command as one line that a shell reads back as the same words.
quote_command() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(shell_quote "$word")"
  done
  printf '%s\n' "$out"
}

# Runs a command, or with --dry-run prints it (to stdout) instead.
run() {
  if ((DRY_RUN)); then
    quote_command "$@"
  else
    echo "+ $(quote_command "$@")" >&2
    "$@"
  fi
}

# remote_ssh WORKER COMMAND: runs COMMAND (a shell string) on the worker(s) of the TPU.
remote_ssh() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${SCOPE[@]}" --worker="$1" --command="$2"
}

# check_worker VALUE: "all", a worker index, or a gcloud list / range such as 1,3 or 0-3.
check_worker() {
  [[ $1 == all || $1 =~ ^[0-9]+([-,][0-9]+)*$ ]] ||
    die "--worker=$1: expected all, a worker index (0, 1, ...) or a list such as 0,2 or 0-3"
}
