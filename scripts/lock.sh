#!/usr/bin/env bash
# Regenerate the hash-locked environment: requirements/lock-cpu.txt and requirements/lock-cuda.txt (`make lock`).
#
# Each lock is one `uv pip compile --universal --generate-hashes` of requirements/lock.in + pyproject.toml (all
# extras) + requirements/torch-<variant>.txt: one file for every Python from 3.11 up (the README's supported
# 3.11-3.13 are installed from it in CI: `make check-install`), with an environment marker where a pin applies to
# some Pythons or platforms only. `--fork-strategy fewest` keeps one version of a package for all Pythons where
# one version fits them all, so 3.11 and 3.13 run the same code. The sha256 of every file of each pinned release is
# listed (all platforms the registry serves), so pip can check whatever file it picks. Deterministic: uv comes from requirements/lock-tool.txt (pinned, hashed), nothing is taken
# from the old locks (--upgrade), and only uploads up to LOCK_SNAPSHOT count (--exclude-newer), so the same
# inputs give the same locks on any day. Move LOCK_SNAPSHOT forward on purpose to take newer releases.
#
# The cpu lock's torch is PyTorch's CPU build, which the default registry does not serve: it is read from
# TORCH_CPU_FIND_LINKS, a folder holding the torch-2.13.0+cpu wheel(s) (default /opt/wheels, where our machines
# keep the CPython 3.11 one). Fill such a folder elsewhere with `pip download --no-deps --index-url <PyTorch CPU
# index> torch==2.13.0+cpu --python-version 3.12 --platform manylinux_2_28_x86_64 -d DIR` (one call per Python
# and platform to cover); the lock then lists the hash of every file in it, and scripts/install.sh uses the cpu
# lock wherever one of those files is reachable (else the cuda lock, whose torch runs on a CPU too).
#
# Usage: scripts/lock.sh            (needs the package registry; ~3-4 min on 2 cores)
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
cd "$HERE"
LOCK_SNAPSHOT=${LOCK_SNAPSHOT:-2026-12-04T18:00:00Z}
TORCH_CPU_FIND_LINKS=${TORCH_CPU_FIND_LINKS:-/opt/wheels}
LOCK_MIN_PYTHON=3.11  # the oldest Python the locks cover (zarr 3 and numpy 2.3 need 3.11); scripts/lockfile.py checks it
TOOL=.venv-lock

if ! ls "$TORCH_CPU_FIND_LINKS"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
  echo "lock.sh: no torch-2.13.0+cpu wheel in TORCH_CPU_FIND_LINKS=$TORCH_CPU_FIND_LINKS; the cpu lock needs the" \
       "CPU build's files (see the head of this script for how to fill such a folder)" >&2
  exit 2
fi
if ! cmp -s requirements/lock-tool.txt "$TOOL/.lock-tool.txt" 2>/dev/null; then
  rm -rf "$TOOL"
  python3 -m venv "$TOOL"
  "$TOOL/bin/python" -m pip install -q --progress-bar off --require-hashes --no-deps -r requirements/lock-tool.txt
  cp requirements/lock-tool.txt "$TOOL/.lock-tool.txt"
fi

compile() {  # compile VARIANT [extra uv options]: writes requirements/lock-VARIANT.txt
  local variant=$1; shift
  local out; out=$(mktemp)
  # --no-config: no uv.toml/pyproject [tool.uv] or user config changes the result; UV_* settings likewise.
  env -u UV_INDEX_URL -u UV_EXTRA_INDEX_URL -u UV_FIND_LINKS -u UV_CONSTRAINT -u UV_EXCLUDE_NEWER \
    "$TOOL/bin/uv" pip compile requirements/lock.in pyproject.toml --all-extras \
      -c "requirements/torch-$variant.txt" \
      --generate-hashes --upgrade --no-config --quiet \
      --universal --fork-strategy fewest --python-version "$LOCK_MIN_PYTHON" \
      --exclude-newer "$LOCK_SNAPSHOT" \
      --custom-compile-command "make lock" \
      "$@" -o "$out"
  # The header records what the lock was made from (the snapshot is not in uv's header).
  { sed -n '1,2p' "$out"; echo "#    (snapshot: uploads up to $LOCK_SNAPSHOT; universal: Python >= $LOCK_MIN_PYTHON, any platform; torch variant: $variant)"; \
    sed '1,2d' "$out"; } > "requirements/lock-$variant.txt"
  rm -f "$out"
  echo "lock.sh: requirements/lock-$variant.txt: $(grep -c '^[A-Za-z0-9]' "requirements/lock-$variant.txt") packages," \
       "$(grep -c -- '--hash=sha256:' "requirements/lock-$variant.txt") hashes"
}

compile cpu --find-links "$TORCH_CPU_FIND_LINKS"
compile cuda
python3 scripts/lockfile.py check
echo "lock.sh: review \`git diff requirements/lock-*.txt\` (new packages, new versions, changed hashes), then commit"
