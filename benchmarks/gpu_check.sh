#!/usr/bin/env bash
# One command to validate and measure the entropy kernels on a CUDA machine (target: under 5 minutes).
#
#   benchmarks/gpu_check.sh             on a GPU machine, from the repository root or anywhere:
#     1. build the CUDA extension from kernels/ (nemo-entropy build-kernels --cuda-only)
#     2. nemo-entropy check-kernels --device cuda --require cuda (auto picks it; float64 spot check)
#     3. the GPU tests (tests/gpu, marker cuda): the CUDA kernel and compiled Triton against the float64
#        oracle, fp32/bf16/fp16, padded vocabularies, unaligned rows, determinism; TP=2 over NCCL when two
#        GPUs are visible
#     4. forward+backward benchmark against naive PyTorch and megatron-core's vocab_parallel_cross_entropy
#        plus a verl-style entropy: time, GB/s, % of the HBM peak, peak memory
#     5. one summary: step status and times, then the benchmark table
#   benchmarks/gpu_check.sh --dry-run   on any machine (CI runs it): print every step above with its exact
#     command, and rehearse what a CPU can: shellcheck this script, collect tests/gpu as on a GPU, run the
#     GPU tests on CPU stand-ins (CPU kernel for CUDA, reference for Triton, gloo for NCCL), nvcc-compile
#     the .cu files, check-kernels on CPU, and the benchmark's table code (roofline columns) on a tiny shape.
#
# Options: --dry-run, --out DIR (logs and the table; default runs/gpu_check), --widths "19008 32768 152064",
# --rows N (default 4096), --repeat N (default 10). Environment: PYTHON (default: python3, else python),
# MAX_JOBS (parallel compile jobs of the build). Exit status: 0 when every step passed.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
dry_run=0
out="$repo/runs/gpu_check"
widths="19008 32768 152064"
rows=4096
repeat=10
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --out) out=$2; shift ;;
        --widths) widths=$2; shift ;;
        --rows) rows=$2; shift ;;
        --repeat) repeat=$2; shift ;;
        -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "${PYTHON:-}" ]; then
    PYTHON=$(command -v python3 || command -v python)
fi
cd "$repo" || exit 2
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's nemo_entropy and tests
mkdir -p "$out"
started=$(date +%s)
summary=()
failed=0

# run NAME CMD...: run a step, log its output to $out/NAME.log (and the terminal), record status and time.
run() {
    local name=$1
    shift
    local t0 status
    t0=$(date +%s)
    echo
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log"
    status=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - t0 ))
    if [ "$status" -eq 0 ]; then
        summary+=("  ok      ${took}s  $name")
    else
        summary+=("  FAILED  ${took}s  $name (exit $status, log: $out/$name.log)")
        failed=1
    fi
}

# would NAME CMD...: the dry run's record of a GPU step.
would() {
    local name=$1
    shift
    echo
    echo "== [dry run] on a GPU, step '$name' runs: $*"
    summary+=("  (would) $name: $*")
}

bench_cmd=("$PYTHON" benchmarks/entropy.py --device cuda --rows "$rows" --repeat "$repeat" --widths)
read -r -a width_list <<< "$widths"
bench_cmd+=("${width_list[@]}")

if [ "$dry_run" -eq 1 ]; then
    echo "gpu_check.sh --dry-run: $(date -u +%FT%TZ), $("$PYTHON" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"
    would build "$PYTHON" -m nemo_entropy.cli build-kernels --cuda-only
    would check-kernels "$PYTHON" -m nemo_entropy.cli check-kernels --device cuda --require cuda
    would tests "$PYTHON" -m pytest -q -m cuda tests/gpu
    would benchmark "${bench_cmd[@]}"
    echo
    echo "== rehearsal on this CPU machine"
    if command -v shellcheck > /dev/null; then
        run shellcheck shellcheck "${BASH_SOURCE[0]}"
    else
        summary+=("  -       shellcheck not installed: script not linted")
    fi
    run collect-gpu-tests env NEMO_ENTROPY_GPU_TESTS=1 "$PYTHON" -m pytest -q --collect-only -m cuda tests/gpu
    run gpu-tests-on-cpu env NEMO_ENTROPY_GPU_TESTS=cpu OMP_NUM_THREADS=1 "$PYTHON" -m pytest -q -m cuda tests/gpu
    run build-cpu-and-nvcc "$PYTHON" -m nemo_entropy.cli build-kernels --cpu-only --nvcc-check --quiet
    run check-kernels-cpu "$PYTHON" -m nemo_entropy.cli check-kernels --device cpu --require cpu
    run benchmark-table-code env OMP_NUM_THREADS=1 "$PYTHON" benchmarks/entropy.py --device cpu --rows 64 \
        --widths 1031 --repeat 1 --peak-gbps 100
else
    if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_check.sh: torch ($PYTHON) sees no CUDA device; on a CPU machine use --dry-run" >&2
        exit 2
    fi
    "$PYTHON" - <<'EOF' 2>&1 | tee "$out/environment.log"
import shutil, torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), nvcc: {shutil.which('nvcc')}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
for name in ("triton", "megatron.core"):
    try:
        module = __import__(name, fromlist=["__version__"])
        print(f"{name} {getattr(module, '__version__', '?')}")
    except ImportError as err:
        print(f"{name}: not importable ({err}); its part is skipped")
EOF
    run build "$PYTHON" -m nemo_entropy.cli build-kernels --cuda-only
    run check-kernels "$PYTHON" -m nemo_entropy.cli check-kernels --device cuda --require cuda
    run tests "$PYTHON" -m pytest -q -m cuda tests/gpu
    run benchmark "${bench_cmd[@]}"
fi

total=$(( $(date +%s) - started ))
echo
echo "================ gpu_check.sh summary ($total s; logs in $out)"
printf '%s\n' "${summary[@]}"
if [ "$dry_run" -eq 0 ] && [ -f "$out/benchmark.log" ]; then
    echo
    grep -E '^(#|\|)' "$out/benchmark.log"
fi
if [ "$total" -gt 300 ]; then
    echo "note: took $total s, more than the 5-minute target"
fi
exit "$failed"
