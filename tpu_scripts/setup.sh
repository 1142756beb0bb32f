#!/usr/bin/env bash
# Copies this repository to every worker of a TPU and installs it there with jax[tpu].
#
#   bash tpu_scripts/setup.sh --name=NAME --zone=ZONE [options]
#
#   --name, --zone, --project as for create.sh
#   --git-ref REF      copy the commit REF (git archive) instead of the working tree
#   --python PYTHON    interpreter for the workers' venv (default: python3 if it is 3.11 or
#                      newer, else python3.11, installed with apt-get when missing)
#   --worker WORKERS   all (default), or e.g. 0 or 1,3
#   --dry-run          print the gcloud commands instead of running them
#   -h, --help         this text
#
# By default the working tree is copied as it is: tracked and untracked files, without what
# .gitignore excludes (.venv, runs/, ...), so uncommitted config edits travel with it. On each
# worker the code lands in ~/zerosearch-jax (replaced on every run; its .venv is kept, so a
# second run only reinstalls the project), then scripts/setup.sh creates ~/zerosearch-jax/.venv
# and installs the project, and jax[tpu] is installed at the version of the installed jax.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

GIT_REF=""
PYTHON=""
WORKER=all

split_flag_values "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case "$1" in
    --git-ref) GIT_REF=$(flag_value "$@"); shift 2 ;;
    --python) PYTHON=$(flag_value "$@"); shift 2 ;;
    --worker) WORKER=$(flag_value "$@"); shift 2 ;;
    *) common_flag "$@"; shift "$CONSUMED" ;;
  esac
done
require_tpu
check_worker "$WORKER"
scope_flags

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARBALL="${TMPDIR:-/tmp}/zerosearch-jax-$TPU_NAME.tar.gz"
REMOTE_TARBALL="zerosearch-jax.tar.gz"  # in the workers' home directories

# -- pack -----------------------------------------------------------------------------------------
if [[ -n $GIT_REF ]]; then
  git -C "$REPO_ROOT" rev-parse --verify --quiet "$GIT_REF^{commit}" >/dev/null ||
    die "--git-ref=$GIT_REF: not a commit of $REPO_ROOT"
  PACK=(git -C "$REPO_ROOT" archive --format=tar.gz --output="$TARBALL" "$GIT_REF")
  if ((DRY_RUN)); then echo "# pack: $(quote_command "${PACK[@]}")"; else "${PACK[@]}"; fi
else
  if ((DRY_RUN)); then
    echo "# pack: the working tree of $REPO_ROOT (git ls-files --cached --others --exclude-standard) into $TARBALL"
  else
    # Files git lists but that are deleted in the working tree are left out.
    FILES=()
    while IFS= read -r -d '' f; do
      [[ -e $REPO_ROOT/$f ]] && FILES+=("$f")
    done < <(git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard)
    ((${#FILES[@]})) || die "$REPO_ROOT: git lists no files to copy"
    printf '%s\0' "${FILES[@]}" | tar -C "$REPO_ROOT" --null -T - -czf "$TARBALL"
    echo "packed ${#FILES[@]} files into $TARBALL ($(du -h "$TARBALL" | cut -f1))" >&2
  fi
fi

# -- copy -----------------------------------------------------------------------------------------
run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:$REMOTE_TARBALL" "${SCOPE[@]}" \
  --worker="$WORKER"

# -- install (on each worker) ---------------------------------------------------------------------
if [[ -n $PYTHON ]]; then
  PICK_PYTHON="PY=$(shell_quote "$PYTHON")"
else
  PICK_PYTHON='PY=python3; python3 -c "import sys; sys.exit(sys.version_info < (3, 11))" || PY=python3.11'
fi
# apt-get only when the interpreter is missing: Ubuntu 22.04 images ship Python 3.10, and
# current jax releases need 3.11 or newer.
INSTALL="set -euo pipefail; $PICK_PYTHON; \
if ! command -v \"\$PY\" >/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq \"\$PY\" \"\$PY-venv\"; fi; \
mkdir -p ~/$REMOTE_DIR && cd ~/$REMOTE_DIR; \
find . -mindepth 1 -maxdepth 1 ! -name .venv ! -name logs -exec rm -rf {} +; \
tar -xzf ~/$REMOTE_TARBALL && rm ~/$REMOTE_TARBALL; \
PYTHON=\"\$PY\" bash scripts/setup.sh; \
.venv/bin/python -m pip install --quiet \"jax[tpu]==\$(.venv/bin/python -c 'import jax; print(jax.__version__)')\"; \
echo \"\$(hostname): installed in ~/$REMOTE_DIR\""
remote_ssh "$WORKER" "$INSTALL"
