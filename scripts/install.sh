#!/usr/bin/env bash
# Create or refresh the project's virtual environment from the hash-locked requirements. Idempotent; `make env`
# calls it when requirements/*, pyproject.toml or this script changed.
#
# Every file pip installs is checked against a lock (see docs/install.md): requirements/lock-cpu.txt or
# requirements/lock-cuda.txt, written by `make lock`, list the sha256 of every file of every pinned release for
# every supported Python (3.11-3.13), and pip runs with --require-hashes, so a file whose hash is not listed stops
# the install. Order matters:
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
# Which torch (--torch auto, the default), decided once and said in the last line:
#   * the build of a torch 2.13.0 already in the venv (a refresh keeps it);
#   * else cuda where `nvidia-smi -L` lists a GPU;
#   * else PyTorch's CPU build (the cpu lock) where a file of it whose hash the lock lists is reachable by pip
#     (our machines keep one in pip's find-links; PyTorch's own index serves it, the public registry does not);
#   * else the registry's torch (the cuda lock): the CUDA build, which runs on a CPU too; the line before the
#     install says so, with what it downloads.
#
# Offline, for a GPU node without internet whose torch is installed (an NVIDIA PyTorch container, an air-gapped
# cluster; docs/gpu.md): `--wheelhouse DIR` (or WHEELHOUSE=DIR, e.g. `make env WHEELHOUSE=DIR`) installs from DIR, a
# wheelhouse that scripts/wheelhouse.py built elsewhere for this node: the locked packages the node lacks, with the
# lock's hashes. The venv is made over PYTHON (the node's, holding its torch) with --system-site-packages, so the
# node's torch (and whatever else the wheelhouse left to the node) is used; pip runs with --no-index --find-links DIR,
# steps 1-4 as above on DIR/requirements.txt (the lock cut to DIR's files). Refused, in one line, where DIR was made
# from another lock, for another Python or another torch. `pip check` stops only on the locked stack's problems.
#
# Usage: scripts/install.sh [--torch auto|cpu|cuda | --wheelhouse DIR] [VENV]       (VENV default .venv)
#   --torch cpu|cuda    install that lock whatever the machine has (cpu stops, saying why, where no locked CPU
#                       build of torch is reachable for this Python).
#   --wheelhouse DIR    offline, from DIR, over the node's torch (above).
#   PYTHON=...          the interpreter that creates a new VENV (default python3; 3.11, 3.12 or 3.13).
set -euo pipefail
TORCH=auto
WHEELHOUSE=${WHEELHOUSE:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --torch) TORCH=${2:?"--torch needs auto, cpu or cuda"}; shift 2 ;;
    --torch=*) TORCH=${1#*=}; shift ;;
    --wheelhouse) WHEELHOUSE=${2:?"--wheelhouse needs a folder"}; shift 2 ;;
    --wheelhouse=*) WHEELHOUSE=${1#*=}; shift ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    -*) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
case "$TORCH" in auto|cpu|cuda) ;; *) echo "install.sh: --torch must be auto, cpu or cuda, not $TORCH" >&2; exit 2 ;; esac
if [ -n "$WHEELHOUSE" ] && [ "$TORCH" != auto ]; then
  echo "install.sh: --wheelhouse installs over the node's own torch; --torch $TORCH does not apply" >&2; exit 2
fi
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "$WHEELHOUSE" ]; then
  [ -d "$WHEELHOUSE" ] || { echo "install.sh: --wheelhouse $WHEELHOUSE: no such folder" >&2; exit 2; }
  WHEELHOUSE=$(cd "$WHEELHOUSE" && pwd)
fi
cd "$HERE"
START=$(date +%s)
SUPPORTED="3.11 3.12 3.13"  # scripts/lockfile.py SUPPORTED_PYTHONS; `make check-install` installs each in CI
if [ ! -x "$VENV/bin/python" ]; then
  command -v "$PYTHON" >/dev/null || { echo "install.sh: no Python interpreter '$PYTHON'; set PYTHON=/path/to/python3.X" \
                                            "(one of $SUPPORTED)" >&2; exit 2; }
  if [ -n "$WHEELHOUSE" ]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
    # PYTHON may itself be a venv holding torch (e.g. /opt/torch/.venv/bin/python3): --system-site-packages then
    # reaches its base interpreter only, so its own site folders are added to the new venv by a .pth file.
    "$PYTHON" scripts/wheelhouse.py link-node-site "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
elif [ -n "$WHEELHOUSE" ] && ! grep -qiE '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg"; then
  echo "install.sh: $VENV does not see the node's packages (made without --system-site-packages), so it cannot use" \
       "the node's torch; remove it, or name a new VENV" >&2; exit 2
fi
PY="$VENV/bin/python"
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case " $SUPPORTED " in
  *" $PYVER "*) ;;
  *) echo "install.sh: $VENV has Python $PYVER; the locks are tested with Python $SUPPORTED. Remove $VENV and run" \
          "again with PYTHON=/path/to/python3.12 (e.g. \`make env PYTHON=python3.12\`)" >&2; exit 2 ;;
esac
LOG="$VENV/install.log"
PARTS=$(mktemp -d)
trap 'rm -rf "$PARTS"' EXIT
: > "$LOG"

# 0. A lock that no longer matches its inputs would install something other than what requirements/ says.
"$PY" scripts/lockfile.py check >/dev/null || exit 1
# ... nor a wheelhouse made from another lock, for another Python or torch.
PIP_SOURCE=()
if [ -n "$WHEELHOUSE" ]; then
  "$PY" scripts/wheelhouse.py check "$WHEELHOUSE" || exit 1
  PIP_SOURCE=(--no-index --find-links "$WHEELHOUSE")
fi

# Is a file of the cpu lock's torch (PyTorch's CPU build) reachable, with a hash the lock lists? A dry run reads
# a local file in place and fails fast ("no matching distribution") where the configured indexes lack the build.
cpu_torch_reachable() {
  "$PY" scripts/lockfile.py select requirements/lock-cpu.txt --only torch > "$PARTS/torch-cpu.txt"
  # Its own log: a "no matching distribution" here is an answer, not the failure that lockfile.py explain reads.
  "$PY" -m pip install --dry-run --ignore-installed --no-deps --require-hashes --progress-bar off \
    -r "$PARTS/torch-cpu.txt" >"$VENV/torch-probe.log" 2>&1
}

REASON=""
if [ -n "$WHEELHOUSE" ]; then
  TORCH=$("$PY" -c "import json, re, sys; m = re.search(r'lock-(\w+)\.txt', json.load(open(sys.argv[1]))['lock']);
print(m.group(1) if m else 'wheelhouse')" "$WHEELHOUSE/manifest.json")
  REASON="offline from the wheelhouse $WHEELHOUSE, with the node's torch (--system-site-packages)"
elif [ "$TORCH" = auto ]; then
  if TORCH=$("$PY" -c "import torch; assert torch.__version__.split('+')[0] == '2.13.0'; print('cuda' if torch.version.cuda else 'cpu')" 2>/dev/null); then
    REASON="the build already in $VENV"
  elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    TORCH=cuda REASON="nvidia-smi lists a GPU"
  elif cpu_torch_reachable; then
    TORCH=cpu REASON="no GPU; a locked CPU build is reachable"
  else
    TORCH=cuda
    REASON="no GPU and no locked CPU build for Python $PYVER reachable, so the registry's build"
    echo "install.sh: no CPU build of torch 2.13.0 for Python $PYVER is reachable with a hash in requirements/lock-cpu.txt," \
         "so this installs the registry's torch 2.13.0, its CUDA 13 build, which runs on a CPU: 2.7 GB of the" \
         "3.2 GB this install downloads once (a 0.5 GB wheel and 2.2 GB of CUDA libraries and triton; pip caches" \
         "them). To use PyTorch's smaller CPU build instead, see scripts/lock.sh (TORCH_CPU_FIND_LINKS)."
  fi
else
  REASON="asked for (--torch $TORCH)"
fi
LOCK=requirements/lock-$TORCH.txt
[ -z "$WHEELHOUSE" ] || LOCK="$WHEELHOUSE/requirements.txt"  # the lock cut to what the node lacks, hashes kept
echo "install.sh: installing the $TORCH lock ($LOCK) for Python $PYVER, every file checked by sha256; pip's output: $LOG"

# pip install --require-hashes; on failure one paragraph says what was refused and what to do.
pip_locked() {
  if ! "$PY" -m pip install --require-hashes --progress-bar off ${PIP_SOURCE[@]+"${PIP_SOURCE[@]}"} "$@" >>"$LOG" 2>&1; then
    "$PY" scripts/lockfile.py explain "$LOG" "$LOCK"
    exit 1
  fi
}

# A wheelhouse's cut of the lock may lack a package (the node has it): skip such names instead of stopping.
MISSING_OK=()
[ -z "$WHEELHOUSE" ] || MISSING_OK=(--missing-ok)
# 1. The installer's own tools (pip upgrades itself here: the venv's bundled pip may be old).
"$PY" scripts/lockfile.py select "$LOCK" --only pip setuptools wheel ${MISSING_OK[@]+"${MISSING_OK[@]}"} > "$PARTS/tools.txt"
[ ! -s "$PARTS/tools.txt" ] || pip_locked --no-deps -r "$PARTS/tools.txt"
# 2. The stack. The sdist-only packages among it (iopath, antlr4-python3-runtime, stringcase) build with the
#    setuptools of step 1.
"$PY" scripts/lockfile.py select "$LOCK" --exclude sam2 ${MISSING_OK[@]+"${MISSING_OK[@]}"} > "$PARTS/stack.txt"
pip_locked --no-build-isolation -r "$PARTS/stack.txt"
# 3. sam2, then its proof of origin.
"$PY" scripts/lockfile.py select "$LOCK" --only sam2 ${MISSING_OK[@]+"${MISSING_OK[@]}"} > "$PARTS/sam2.txt"
[ ! -s "$PARTS/sam2.txt" ] || SAM2_BUILD_CUDA=0 pip_locked --no-deps --no-build-isolation -r "$PARTS/sam2.txt"
"$PY" scripts/upstream_manifest.py check requirements/upstream/sam2.txt
# 4. This project (a local folder: nothing to hash, nothing downloaded).
if ! "$PY" -m pip install --no-deps --no-build-isolation ${PIP_SOURCE[@]+"${PIP_SOURCE[@]}"} -e . >>"$LOG" 2>&1; then
  echo "install.sh: the editable install of this project failed; see $LOG" >&2; exit 1
fi
if [ -n "$WHEELHOUSE" ]; then  # the venv also sees the node's own packages: only the locked stack's problems count
  "$PY" scripts/wheelhouse.py pip-check "$WHEELHOUSE" || exit 1
else
  "$PY" -m pip check >>"$LOG" 2>&1 || { echo "install.sh: pip check found broken requirements:" >&2; "$PY" -m pip check >&2; exit 1; }
fi
# Fails loudly if the stack does not import (e.g. torchvision's ops are missing). The last line says what was
# installed and why: the one line a user reads.
"$PY" - "$TORCH" "$REASON" "$VENV" "$(( $(date +%s) - START ))" "$LOG" <<'EOF'
import re, sys
import picosam_pipeline, torch, torchvision, sam2, zarr, webdataset, pycocotools, dask.distributed  # noqa: F401
variant, reason, venv, seconds, log = sys.argv[1:]
text = open(log, errors="replace").read()
# pip prints "Downloading NAME-...whl (123.4 MB)" for each file it fetches, from the network or its HTTP cache.
units = {"kB": 1e3, "MB": 1e6, "GB": 1e9}
fetched = sum(float(n) * units[u] for n, u in re.findall(r"Downloading \S+ \(([\d.]+) (kB|MB|GB)\)", text))
device = "a CUDA device is available" if torch.cuda.is_available() else "no CUDA device: runs on the CPU"
print(f"install.sh: done in {int(seconds) // 60} min {int(seconds) % 60} s ({fetched / 1e9:.2f} GB of packages "
      f"fetched, network or pip's cache): {venv} has Python {sys.version.split()[0]} and torch {torch.__version__} "
      f"(the {variant} lock: {reason}; {device}), torchvision {torchvision.__version__}, zarr {zarr.__version__}")
EOF
