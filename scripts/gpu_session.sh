#!/usr/bin/env bash
# One device call does the whole GPU job (see docs/STATUS.md): build from source, the GPU tests,
# the benchmarks; logs and results land in $OUT. Prepare once on the dev machine:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
# then run with carry=[".whl"]:  bash scripts/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/bitfuse-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
( time python3 -m pip install -q --no-build-isolation . ) > "$OUT/install.log" 2>&1 || { tail -40 "$OUT/install.log"; exit 1; }
cd /tmp  # import the installed package, not the source tree
python3 -c "import bitfuse, bitfuse._C as C; print(bitfuse.__version__, C.cuda_status(), C.cuda_archs()); print(bitfuse.backends())" | tee -a "$OUT/device.txt"
SRC=$OLDPWD
timeout ${GPU_TEST_TIMEOUT:-240} python3 -m pytest -m gpu -q -p no:cacheprovider "$SRC/tests" --maxfail=25 --timeout 120 \
  2>&1 | tee "$OUT/gpu_tests.log" | tail -30
timeout ${BENCH_TIMEOUT:-240} python3 -m bitfuse.cli bench kernels ${BENCH_ARGS:---quick} --out "$OUT/kernels" \
  2>&1 | tail -20
ls -la "$OUT" "$OUT/kernels" 2>/dev/null
