#!/usr/bin/env bash
# The one script for the lent GPU machine (H100/H200; python3 3.12 with CUDA torch, einops,
# jaxtyping, beartype, torchdiffeq, tqdm preinstalled; NO internet).
#
# Beforehand, here:  bash benchmarks/fetch_gpu_wheels.sh     (fills <repo>/.whl)
# Then, with the `run` tool, carrying the wheels:
#     run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=420)
# Extra arguments go to run.py, e.g.  bash benchmarks/gpu.sh --workloads gen_text gen_modality
# except two of its own: --with-tests runs the CUDA-only tests first (GPU_TESTS_FILTER, a
# pytest -k expression, picks some; GPU_TESTS_BUDGET seconds), --with-profile runs
# benchmarks/gpu_profile.py after the benchmark (PROFILE_BUDGET seconds), and --no-bench
# skips the benchmark itself (a call for the profile alone):
#     run(command="PROFILE_BUDGET=240 bash benchmarks/gpu.sh --no-bench --with-profile", carry=[".whl"], timeout_s=300)
#
# What it does:
#   1. installs the peer (transfusion-pytorch==0.20.0) and its missing dependencies from .whl
#      into /tmp/peer_site (--no-index --no-deps --target): the peer is only ever imported with
#      PYTHONPATH=/tmp/peer_site, ours only with PYTHONPATH=<repo>, so the two
#      `transfusion_pytorch` packages never meet;
#   2. runs benchmarks/run.py --size gpu: the bf16 matmul peak (8192^3, for MFU), then the four
#      workloads, ours and the peer in alternating subprocesses; bf16 autocast on both sides,
#      the peer with flex attention (its documented CUDA fast path);
#   3. leaves the log and the JSON in $OUT (bench_gpu.log, bench_gpu.json), the JSON rewritten
#      after every workload, so a run cut short still returns what it measured.
# Budget: about 6 minutes (BENCH_BUDGET seconds, default 330); subprocesses that would start
# after the budget is spent are skipped, and one that runs into it is cut off.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
TESTS=0; PROFILE=0; BENCH=1; ARGS=()
for arg in "$@"; do
    case "$arg" in
        --with-tests) TESTS=1 ;;
        --with-profile) PROFILE=1 ;;
        --no-bench) BENCH=0 ;;
        *) ARGS+=("$arg") ;;
    esac
done
OUT="${OUT:-/tmp/bench_out}"
mkdir -p "$OUT"
BUDGET="${BENCH_BUDGET:-330}"
PY="${BENCH_PYTHON:-python3}"

ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl: run benchmarks/fetch_gpu_wheels.sh first and carry .whl" >&2; exit 2; }

rm -rf /tmp/peer_site
$PY -m pip install --quiet --no-index --no-deps --target /tmp/peer_site .whl/*.whl 2>&1 | grep -v "Running pip as the 'root' user" || true

# ours: the repo itself; add beartype from the wheels only if the image lacks it
OURS_PATH="$PWD"
if ! $PY -c "import beartype" 2>/dev/null; then
    $PY -m pip install --quiet --no-index --no-deps --target /tmp/ours_site .whl/beartype-*.whl
    OURS_PATH="$PWD:/tmp/ours_site"
fi

if [ "$TESTS" = 1 ]; then
    PYTHONPATH="$OURS_PATH" timeout "${GPU_TESTS_BUDGET:-120}" $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py \
        ${GPU_TESTS_FILTER:+-k "$GPU_TESTS_FILTER"} 2>&1 | tail -25 | tee "$OUT/gpu_tests.log" || true
fi

if [ "$BENCH" = 1 ]; then {
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
    $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" || true
    PYTHONPATH=/tmp/peer_site $PY -P -c "import transfusion_pytorch, importlib.metadata as m; print('peer', m.version('transfusion-pytorch'), transfusion_pytorch.__file__)" || true

    $PY benchmarks/run.py --size gpu \
        --ours-python "$PY" --ours-pythonpath "$OURS_PATH" \
        --peer-python "$PY" --peer-pythonpath /tmp/peer_site \
        --repeats 5 --rounds 1 --timeout 200 --budget "$BUDGET" \
        --json "$OUT/bench_gpu.json" ${ARGS[@]+"${ARGS[@]}"}
} 2>&1 | tee "$OUT/bench_gpu.log"
fi

if [ "$PROFILE" = 1 ]; then
    PYTHONPATH="$OURS_PATH" timeout "${PROFILE_BUDGET:-150}" $PY benchmarks/gpu_profile.py 2>&1 \
        | grep -v -i "warn" | tee "$OUT/gpu_profile.log" || true
fi
