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
# shellcheck source=scripts/gpu_common.sh
source "$(dirname "$0")/gpu_common.sh"
install_bitfuse
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
# low-rank epilogue and the split-K last-block reduction, and the tensor-core GEMV's staged x,
# group sums and warp reduction have barriers no CPU test can exercise.
step racecheck "${RACECHECK_TIMEOUT:-60}" bash -c "compute-sanitizer --tool racecheck --error-exitcode 3 python3 -m pytest \
  -m gpu -q -p no:cacheprovider '$SRC/tests/test_gpu.py' -k 'sanitizer_subset and 70-1999-3' && compute-sanitizer \
  --tool racecheck --error-exitcode 3 python3 -m pytest -m gpu -q -p no:cacheprovider '$SRC/tests/test_gpu.py' \
  -k 'gemv_sanitizer_subset and tc-5' && compute-sanitizer \
  --tool synccheck --error-exitcode 3 python3 -m pytest -m gpu -q -p no:cacheprovider '$SRC/tests/test_gpu.py' \
  -k 'sanitizer_subset and 9-77'"
# End to end (issue #7) does not fit beside the rest: scripts/gpu_e2e.sh, a second call while the
# machine is still warm (it reuses this install).
ls -laR "$WORK" >> "$SUMMARY"
pack
cat "$SUMMARY"
