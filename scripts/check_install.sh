#!/usr/bin/env bash
# Install the locks as a user's machine would and run a smoke stage: `make check-install` (CI runs it for 3.12 and
# 3.13 besides the 3.11 of `make test`).
#
# For each Python version given (default: 3.12 3.13):
#   1. find its interpreter: python3.X on PATH, else ~/.pyenv/versions/3.X.*/bin/python (a missing one fails);
#   2. create a fresh venv in a temporary folder and run scripts/install.sh into it with pip seeing only the public
#      registry: no pip configuration file (PIP_CONFIG_FILE=/dev/null: no local wheel folder, mirror or global
#      constraints) and no PIP_* variable but the cache folder and the timeout. install.sh then chooses the torch
#      build as on a user's machine and says which in its last line;
#   3. import the stack, and run the stages sample, prepare and teacher-logits@sam2 (the real SAM2.1 model code,
#      random weights, in process) on the built-in sample, in a temporary copy of params.yaml's layout.
# Stops at the first failure with the step and the end of its log; prints one line per Python on success.
#
# Usage: scripts/check_install.sh [3.12 3.13 ...]      (needs the public package registry; ~4-8 min per Python,
#                                                       ~3.3 GB downloaded into pip's cache on first use)
#   KEEP=1 keeps the temporary folders (printed) for a look.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
VERSIONS=("$@")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(3.12 3.13)

find_python() {  # find_python 3.12 -> path of an interpreter of that version
  local v=$1 p
  for p in "$(command -v "python$v" || true)" "$HOME"/.pyenv/versions/"$v".*/bin/python; do
    if [ -n "$p" ] && [ -x "$p" ] && [ "$("$p" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$v" ]; then
      echo "$p"; return 0
    fi
  done
  return 1
}

for v in "${VERSIONS[@]}"; do
  py=$(find_python "$v") || { echo "check_install: no Python $v (neither python$v on PATH nor ~/.pyenv/versions/$v.*)" >&2; exit 1; }
  work=$(mktemp -d "${TMPDIR:-/tmp}/picosam-install-$v.XXXXXX")
  [ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT
  start=$(date +%s)
  echo "check_install: Python $v ($py): installing into $work/venv with the public registry only"
  # A user's pip: no config file, no find-links, no extra index, no constraints; the cache and timeout kept.
  if ! env $(env | sed -n 's/^\(PIP_[A-Z_]*\)=.*/-u \1/p' | grep -v -e PIP_CACHE_DIR -e PIP_DEFAULT_TIMEOUT) \
        PIP_CONFIG_FILE=/dev/null PYTHON="$py" bash "$HERE/scripts/install.sh" "$work/venv"; then
    echo "check_install: Python $v: install failed (log: $work/venv/install.log)" >&2
    tail -20 "$work/venv/install.log" >&2 || true
    exit 1
  fi
  installed=$(( $(date +%s) - start ))
  # The smoke stages run in their own folder: params.yaml's relative paths (data/..., metrics) land there.
  mkdir "$work/project"
  cp "$HERE/params.yaml" "$work/project/"
  (
    cd "$work/project"
    export PATH="$work/venv/bin:$PATH" DVC_NO_ANALYTICS=1
    for stage in sample prepare teacher-logits@sam2; do
      extra=()
      [ "$stage" = teacher-logits@sam2 ] && extra=(--set teacher.executor=local)
      if ! picosam-pipeline run-stage "$stage" "${extra[@]}" > "$work/$stage.log" 2>&1; then
        echo "check_install: Python $v: run-stage $stage failed:" >&2; tail -20 "$work/$stage.log" >&2; exit 1
      fi
    done
  )
  echo "check_install: Python $v: ok: install $installed s, smoke stages (sample, prepare, teacher-logits@sam2)" \
       "$(( $(date +%s) - start - installed )) s"
  [ "${KEEP:-0}" = 1 ] && echo "check_install: kept $work"
  [ "${KEEP:-0}" = 1 ] || { rm -rf "$work"; trap - EXIT; }
done
