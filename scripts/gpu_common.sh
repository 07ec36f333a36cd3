# Shared by scripts/gpu_session.sh and scripts/gpu_e2e.sh (sourced, from the repository root):
# $OUT/$WORK/$SUMMARY, a deadline, step(), the carried wheels, the device line, install_bitfuse.
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
PIP=${PIP:-"python3 -m pip install -q --no-index --disable-pip-version-check --no-build-isolation"}
# A CUDA build that fails there must not cost the session its Triton and HBP-Triton results:
# then build the host part alone (about 30 s) and go on; the CUDA tests skip with the reason.
install_bitfuse() {
  if ! step install 130 $PIP .; then
    echo "!!! CUDA build failed (install.log): retrying with BITFUSE_CUDA=0" >> "$SUMMARY"
    step install_nocuda 60 env BITFUSE_CUDA=0 $PIP . || { cat "$SUMMARY"; exit 1; }
  fi
}
