#!/usr/bin/env bash
# The package as users install it (issue 13): wheels built from the working tree, each installed into a
# fresh virtual environment with torch pinned to the 2.13.0 CPU build in the same pip command, the kernels
# built from the *installed* package, and `nemo-entropy check-kernels` proving that backend='auto' uses the
# compiled CPU kernel there (not the PyTorch reference) and that it agrees with float64.
#
#   1. isolated build (plain `pip wheel .`): must stay pure Python and never pull torch; the kernel sources
#      ship as package data and `nemo-entropy build-kernels` builds them just in time into the cache;
#   2. `pip wheel --no-build-isolation .` with torch present: setup.py compiles the CPU kernel into the
#      wheel; with an empty kernel cache, check-kernels must load the prebuilt one.
#
# Usage: .ci/wheel_check.sh   (after `make setup`; BUILD_PY is the Python with torch that builds wheel 2,
# PY the interpreter that creates the fresh environment, as in the Makefile)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_PY=${BUILD_PY:-.venv/bin/python}
PY=${PY:-python3}
BUILD_PY=$(cd "$(dirname "$BUILD_PY")" && pwd)/$(basename "$BUILD_PY")
work=$(mktemp -d /tmp/nemo_entropy_wheel.XXXXXX)
trap 'rm -rf "$work"' EXIT
t0=$(date +%s)
step() { echo "-- [$(( $(date +%s) - t0 )) s] $*"; }
list() { "$BUILD_PY" -m zipfile -l "$1"; }  # no unzip needed

step "copy the working tree (tracked + untracked, not ignored) to $work/src"
mkdir -p "$work/src"
git ls-files -z --cached --others --exclude-standard \
    | tar --null --files-from=- --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$work/src"

step "wheel 1: isolated build (no torch in the build environment)"
"$BUILD_PY" -m pip wheel --quiet --no-deps -w "$work/pure" "$work/src"
pure=$(ls "$work"/pure/nemo_entropy-*-py3-none-any.whl)
list "$pure" | grep -F "nemo_entropy/kernels/entropy_row.h" > /dev/null || { echo "kernel sources missing from $pure"; exit 1; }
if list "$pure" | grep "\.so " > /dev/null; then echo "an isolated build compiled something: $pure"; exit 1; fi

step "fresh venv: torch==2.13.0 (CPU) + ninja + wheel 1, one pip command"
"$PY" -m venv "$work/venv"
V="$work/venv/bin"
"$V/pip" install --quiet torch==2.13.0 ninja numpy "$pure"
"$V/python" -c "import torch; assert torch.version.cuda is None, 'a CUDA torch was installed: ' + torch.__version__"
cd "$work"  # never import the checkout: everything below runs from site-packages
"$V/python" -c "import nemo_entropy, sys; f = nemo_entropy.__file__; print('nemo_entropy from', f); sys.exit('site-packages' not in f)"

step "just-in-time build from the installed package's kernel sources"
NEMO_ENTROPY_KERNEL_CACHE="$work/cache" "$V/nemo-entropy" build-kernels --cpu-only --quiet
step "check-kernels: auto must use the compiled CPU kernel from the cache"
NEMO_ENTROPY_KERNEL_CACHE="$work/cache" "$V/nemo-entropy" check-kernels --device cpu --require cpu --require-origin cache

step "wheel 2: --no-build-isolation with torch: the CPU kernel compiled at build time"
NEMO_ENTROPY_BUILD_CPU=1 "$BUILD_PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$work/ext" "$work/src"
cd "$work"
ext=$(ls "$work"/ext/nemo_entropy-*.whl)
list "$ext" | grep -F "nemo_entropy/entropy/prebuilt_kernels.json" > /dev/null || { echo "no prebuilt kernel in $ext"; exit 1; }
"$V/pip" install --quiet --force-reinstall --no-deps "$ext"
step "check-kernels with an empty kernel cache: auto must use the prebuilt CPU kernel"
NEMO_ENTROPY_KERNEL_CACHE="$work/empty" "$V/nemo-entropy" check-kernels --device cpu --require cpu --require-origin prebuilt
step "wheel check passed: $(basename "$pure"), $(basename "$ext")"
