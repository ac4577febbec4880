#!/usr/bin/env bash
# Create or refresh the project's virtual environment from the hash-locked requirements. Idempotent; `make env`
# calls it when requirements/*, pyproject.toml or this script changed.
#
# Every file pip installs is checked against a lock (see README, "Install notes"): requirements/lock-cpu.txt or
# requirements/lock-cuda.txt, written by `make lock`, list the sha256 of every file of every pinned release, and
# pip runs with --require-hashes, so a file whose hash is not listed stops the install. Order matters:
#   0. the lock must match its inputs (requirements/*.txt, pyproject.toml): a stale lock stops here.
#   1. pip, setuptools and wheel from the lock (the sdist-only packages are built with them, without build
#      isolation: pip does not check what an isolated build environment downloads).
#   2. everything but sam2, torch first among them by pip's order. An existing torch 2.13.0 of the chosen build
#      is kept.
#   3. sam2 from its sdist with --no-build-isolation (its build needs torch, already there; an isolated build
#      would download another torch) and SAM2_BUILD_CUDA=0, which skips its optional CUDA extension (only used
#      for mask post-processing, not for logits). Then its installed files are compared with
#      facebookresearch/sam2 at 2b90b9f (requirements/upstream/sam2.txt): the registry's sam2 is not Meta's upload.
#   4. this project, editable, without dependencies (nothing downloaded).
#
# Usage: scripts/install.sh [--torch cpu|cuda] [--torch-index cpu|URL] [VENV]
#   --torch cpu|cuda    which lock (torch build) to install. Default: the build of a torch 2.13.0 already in the
#                       venv; else cuda where `nvidia-smi -L` lists a GPU; else cpu.
#   --torch-index cpu   also look for torch on the PyTorch CPU wheel index (a CPU machine that does not already
#                       hold the CPU wheel, as ours do in pip's find-links). The file found there must still have
#                       a hash in the lock. --torch-index URL: any other extra index (a mirror).
set -euo pipefail
TORCH_INDEX=""
TORCH=""
while [ $# -gt 0 ]; do
  case "$1" in
    --torch) TORCH=${2:?"--torch needs cpu or cuda"}; shift 2 ;;
    --torch=*) TORCH=${1#*=}; shift ;;
    --torch-index) TORCH_INDEX=${2:?"--torch-index needs cpu or an index URL"}; shift 2 ;;
    --torch-index=*) TORCH_INDEX=${1#*=}; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    -*) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ "$TORCH_INDEX" = cpu ] && { TORCH_INDEX=https://download.pytorch.org/whl/cpu; TORCH=${TORCH:-cpu}; }
VENV=${1:-.venv}
HERE=$(cd "$(dirname "$0")/.." && pwd)
cd "$HERE"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
LOG="$VENV/install.log"
PARTS=$(mktemp -d)
trap 'rm -rf "$PARTS"' EXIT
: > "$LOG"

if [ -z "$TORCH" ]; then
  if TORCH=$("$PY" -c "import torch; assert torch.__version__.split('+')[0] == '2.13.0'; print('cuda' if torch.version.cuda else 'cpu')" 2>/dev/null); then :
  elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then TORCH=cuda
  else TORCH=cpu
  fi
fi
case "$TORCH" in cpu|cuda) ;; *) echo "install.sh: --torch must be cpu or cuda, not $TORCH" >&2; exit 2 ;; esac
LOCK=requirements/lock-$TORCH.txt

# 0. A lock that no longer matches its inputs would install something other than what requirements/ says.
"$PY" scripts/lockfile.py check >/dev/null || exit 1
echo "install.sh: installing the $TORCH lock ($LOCK), every file checked by sha256; pip's output: $LOG"

# pip install --require-hashes; on failure one paragraph says what was refused and what to do.
pip_locked() {
  if ! "$PY" -m pip install --require-hashes --progress-bar off "$@" >>"$LOG" 2>&1; then
    "$PY" scripts/lockfile.py explain "$LOG" "$LOCK"
    exit 1
  fi
}

# 1. The installer's own tools (pip upgrades itself here: the venv's bundled pip may be old).
"$PY" scripts/lockfile.py select "$LOCK" --only pip setuptools wheel > "$PARTS/tools.txt"
pip_locked --no-deps -r "$PARTS/tools.txt"
# 2. The stack. The sdist-only packages among it (iopath, antlr4-python3-runtime, stringcase) build with the
#    setuptools of step 1.
"$PY" scripts/lockfile.py select "$LOCK" --exclude sam2 > "$PARTS/stack.txt"
pip_locked --no-build-isolation ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} -r "$PARTS/stack.txt"
# 3. sam2, then its proof of origin.
"$PY" scripts/lockfile.py select "$LOCK" --only sam2 > "$PARTS/sam2.txt"
SAM2_BUILD_CUDA=0 pip_locked --no-deps --no-build-isolation -r "$PARTS/sam2.txt"
"$PY" scripts/upstream_manifest.py check requirements/upstream/sam2.txt
# 4. This project (a local folder: nothing to hash, nothing downloaded).
if ! "$PY" -m pip install --no-deps --no-build-isolation -e . >>"$LOG" 2>&1; then
  echo "install.sh: the editable install of this project failed; see $LOG" >&2; exit 1
fi
"$PY" -m pip check
# Fails loudly if the stack does not import (e.g. a CUDA torch crept in, or torchvision's ops are missing).
"$PY" -c "import picosam_pipeline, torch, torchvision, sam2, zarr, webdataset, pycocotools, dask.distributed; \
print(f'environment ok: torch {torch.__version__} (cuda={torch.version.cuda}), torchvision {torchvision.__version__}, zarr {zarr.__version__}')"
