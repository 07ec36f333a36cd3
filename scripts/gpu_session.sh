#!/usr/bin/env bash
# One device call does the whole GPU job (see docs/STATUS.md): build from source, the GPU tests,
# a compute-sanitizer subset, the kernel and SpMV benchmarks. Sized for the device budget of a
# session (15 minutes in all, the machine's start included; 10 minutes per call): every step runs
# under its own limit AND a deadline ${DEADLINE:-560} s after the start, so the command ends before
# timeout_s=600 with everything packed; a step with under 15 s left is skipped, and says so. Do not
# plan a rerun in the same session.
# Only 8 files come back from $OUT: every log and result goes to $WORK and is re-packed into
# $OUT/results.tgz after each step (so a step that runs out of time loses nothing before it);
# $OUT/summary.txt holds the tails. Prepare once on the dev machine:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
#   python3 -m pip wheel --no-deps -w .whl gemlite==0.6.0.post2   # optional baseline (an sdist)
# then run with carry=[".whl"]:  bash scripts/gpu_session.sh
# Then: mkdir -p r && tar xzf <files_at>/results.tgz -C r, and commit r/kernels, r/spmv into
# benchmarks/results/<device>/ with the logs' verdicts in docs/STATUS.md.
set -uo pipefail
OUT=${OUT:-/tmp/bitfuse-out}
WORK=${WORK:-/tmp/bitfuse-work}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
END=$((SECONDS + ${DEADLINE:-560}))
pack() { tar czf "$OUT/results.tgz" -C "$WORK" . 2>/dev/null; }
step() {  # step NAME SECONDS CMD... : run with a timeout, log to $WORK/NAME.log, tail to summary
  local name=$1 secs=$2; shift 2
  local left=$((END - SECONDS - 5)) t0=$SECONDS
  (( secs > left )) && secs=$left
  if (( secs < 15 )); then
    echo "=== $name: SKIPPED, only $((END - SECONDS)) s left before the deadline" >> "$SUMMARY"
    return 124
  fi
  # SIGINT, not SIGTERM: pytest then still prints the failures it has (SIGTERM kills it silently)
  timeout -s INT -k 15 "$secs" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  { echo "=== $name: rc=$rc in $((SECONDS - t0)) s (limit $secs s)"; tail -25 "$WORK/$name.log"; } >> "$SUMMARY"
  pack
  return $rc
}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
else
  echo "!!! no .whl carried: diffusers is absent, so the diffusers-based tests skip (pass carry=[\".whl\"])" >> "$SUMMARY"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$WORK/device.txt" >> "$SUMMARY"
# Build for the machine's own arch only (the four-arch build is CI's job): minutes saved.
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d . )
export BITFUSE_CUDA_ARCHS=${BITFUSE_CUDA_ARCHS:-${CAP:-90}} MAX_JOBS=${MAX_JOBS:-$(nproc)}
PIP="python3 -m pip install -q --no-index --disable-pip-version-check --no-build-isolation"
# A CUDA build that fails there must not cost the session its Triton and HBP-Triton results:
# then build the host part alone (about 30 s) and go on; the CUDA tests skip with the reason.
if ! step install 130 $PIP .; then
  echo "!!! CUDA build failed (install.log): retrying with BITFUSE_CUDA=0" >> "$SUMMARY"
  step install_nocuda 60 env BITFUSE_CUDA=0 $PIP . || { cat "$SUMMARY"; exit 1; }
fi
SRC=$PWD
cd /tmp  # import the installed package, not the source tree
python3 -c "import bitfuse, bitfuse._C as C; print(bitfuse.__version__, C.cuda_status(), C.cuda_archs()); print(bitfuse.backends())" \
  2>&1 | tee -a "$WORK/device.txt" >> "$SUMMARY"
# The tests: 8 xdist workers share the GPU, and each builds its layers and fp64 reference bounds
# on the CPU, so each gets 2 of the 16 cores (unbounded, 8 x 16 OpenMP threads ran the CPU part
# ~40x slower in a measurement here). --timeout-method=thread: a hung kernel (a C-level wait the
# signal method cannot interrupt) costs one worker, not the step.
PYT="env OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 python3 -m pytest -m gpu -q -p no:cacheprovider -n ${XDIST:-8} --timeout-method=thread"
# The CUDA kernels' tests first (no JIT: quick; the cheap HBP/CSR ones ahead of the GEMM sweep),
# then the Triton ones (each variant JIT-compiles; xdist spreads the compiles over the cores).
step gpu_cuda "${GPU_CUDA_TIMEOUT:-120}" $PYT --timeout 60 \
  "$SRC/tests/test_hbp_cuda.py" "$SRC/tests/test_gpu.py" -k "not test_triton_hbp_on_gpu"
step gpu_triton "${GPU_TRITON_TIMEOUT:-110}" $PYT --timeout 90 "$SRC/tests" --ignore "$SRC/tests/test_gpu.py" \
  -k "not test_hbp_cuda or test_triton_hbp_on_gpu"
# compute-sanitizer memcheck on a representative subset of the CUDA GEMM (tests/test_gpu.py
# test_cuda_gemm_sanitizer_subset); no caching allocator, so a read past a tensor is past its
# allocation. Exit status 3 = memcheck found errors.
step memcheck "${SANITIZER_TIMEOUT:-60}" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
  --error-exitcode 3 python3 -m pytest -m gpu -q -p no:cacheprovider "$SRC/tests/test_gpu.py" -k sanitizer_subset
step kernels "${BENCH_TIMEOUT:-100}" python3 -m bitfuse.cli bench kernels ${BENCH_ARGS:---quick} --out "$WORK/kernels"
# SpMV/SpMM: HBP (CUDA, Triton) vs CSR scalar/vector vs torch CSR (benchmarks/bench_spmv.py).
step spmv "${SPMV_TIMEOUT:-50}" python3 -m bitfuse.cli bench kernels --suite sparse ${SPMV_ARGS:---quick} --out "$WORK/spmv"
# racecheck + synccheck on one subset case each: the GEMM's shared-memory stages, the staged
# low-rank epilogue and the split-K last-block reduction have barriers no CPU test can exercise.
step racecheck "${RACECHECK_TIMEOUT:-60}" bash -c "compute-sanitizer --tool racecheck --error-exitcode 3 python3 -m pytest \
  -m gpu -q -p no:cacheprovider '$SRC/tests/test_gpu.py' -k 'sanitizer_subset and 70-1999-3' && compute-sanitizer \
  --tool synccheck --error-exitcode 3 python3 -m pytest -m gpu -q -p no:cacheprovider '$SRC/tests/test_gpu.py' \
  -k 'sanitizer_subset and 9-77'"
# End to end (issue #7), opt-in because it does not fit beside the rest in one call: e.g.
# E2E="sd15-unet:w4 dit-xl-2:w3res sd3-medium:w4" GPU_TRITON_TIMEOUT=1 BENCH_TIMEOUT=1 SPMV_TIMEOUT=1 bash ...
for job in ${E2E:-}; do
  step "e2e_${job/:/_}" "${E2E_TIMEOUT:-150}" python3 -m bitfuse.cli bench e2e --model "${job%%:*}" \
    --recipe "${job##*:}" --steps "${E2E_STEPS:-10}" --resolution 512 --cuda-graphs --out "$WORK/e2e"
done
ls -laR "$WORK" >> "$SUMMARY"
pack
cat "$SUMMARY"
