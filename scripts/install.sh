#!/usr/bin/env bash
# Create or refresh the project's virtual environment. Idempotent; `make env` calls it when
# requirements/*, pyproject.toml or this script changed.
#
# Order matters (see README, "Install notes"):
#   1. torch 2.13.0 first. On a CPU machine of ours `pip install torch==2.13.0` takes the local CPU wheel;
#      on a CUDA machine it takes the registry's CUDA build. An existing torch 2.13.0 (either) is kept.
#   2. everything else with `-c requirements/constraints.txt`, which pins torch so no package can swap it.
#   3. sam2 with --no-build-isolation: pip does not apply constraints inside isolated build environments,
#      so sam2's sdist build would otherwise download a fresh CUDA torch. SAM2_BUILD_CUDA=0 skips its
#      optional CUDA extension (only used for mask post-processing, not for logits).
#
# Usage: scripts/install.sh [--torch-index cpu|URL] [VENV]
#   --torch-index cpu   take torch (and torchvision) from the PyTorch CPU wheel index: on a stock machine whose
#                       pip prefers the registry's default CUDA build, this avoids a multi-GB CUDA download.
#   --torch-index URL   any other index that serves torch 2.13.0 (a mirror, a CUDA variant's index).
set -euo pipefail
TORCH_INDEX=""
while [ $# -gt 0 ]; do
  case "$1" in
    --torch-index) TORCH_INDEX=${2:?"--torch-index needs cpu or an index URL"}; shift 2 ;;
    --torch-index=*) TORCH_INDEX=${1#*=}; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ "$TORCH_INDEX" = cpu ] && TORCH_INDEX=https://download.pytorch.org/whl/cpu
VENV=${1:-.venv}
HERE=$(cd "$(dirname "$0")/.." && pwd)
cd "$HERE"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
# The machine's pip config lists local index folders that lack most packages; pip warns once per package.
pip_q() { "$PY" -m pip install --progress-bar off "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

pip_q -q -U "pip>=24" setuptools wheel
if ! "$PY" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  if [ -n "$TORCH_INDEX" ]; then
    # torchvision from the same index: its CPU build pairs with the CPU torch (no compat shim needed there).
    pip_q -q --index-url "$TORCH_INDEX" torch==2.13.0 torchvision==0.28.0
  else
    pip_q -q torch==2.13.0
  fi
fi
pip_q -q -c requirements/constraints.txt -r requirements/base.txt -r requirements/test.txt
SAM2_BUILD_CUDA=0 pip_q -q --no-build-isolation -c requirements/constraints.txt sam2==1.1.0
pip_q -q --no-deps --no-build-isolation -e .
"$PY" -m pip check
# Fails loudly if the stack does not import (e.g. a CUDA torch crept in, or torchvision's ops are missing).
"$PY" -c "import picosam_pipeline, torch, torchvision, sam2, zarr, webdataset, pycocotools, dask.distributed; \
print(f'environment ok: torch {torch.__version__} (cuda={torch.version.cuda}), torchvision {torchvision.__version__}, zarr {zarr.__version__}')"
