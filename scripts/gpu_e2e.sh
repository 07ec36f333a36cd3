#!/usr/bin/env bash
# The end-to-end GPU job (issue #7): `bitfuse bench e2e` at 512x512, batch 1, fp16 vs bitfuse,
# with CUDA-graph replays, for the models and recipes in $E2E. Meant as the second device call of
# a session, straight after scripts/gpu_session.sh while the machine is warm (its install is
# reused; a fresh machine builds first, ~80-130 s). Give it DEADLINE = the device time left minus
# a margin, and carry=[".whl"] (diffusers). Results come back as $OUT/results.tgz (e2e/*.json,
# *.md) and $OUT/summary.txt, as with gpu_session.sh.
# shellcheck source=scripts/gpu_common.sh
source "$(dirname "$0")/gpu_common.sh"
(cd /tmp && python3 -c "import bitfuse._C, diffusers") >/dev/null 2>&1 || install_bitfuse
cd /tmp
# Issue 7's list first (sd15-unet and dit-xl-2, W4 and W3+residual), then SD3; each model is
# built on the CPU from its published config (random weights) and quantized on the GPU.
for job in ${E2E:-sd15-unet:w4 dit-xl-2:w3res sd15-unet:w3res dit-xl-2:w4 sd3-medium:w4 sd15-unet:w3resc}; do
  step "e2e_${job/:/_}" "${E2E_TIMEOUT:-150}" python3 -m bitfuse.cli bench e2e --model "${job%%:*}" \
    --recipe "${job##*:}" --steps "${E2E_STEPS:-10}" --resolution 512 --cuda-graphs --out "$WORK/e2e"
done
ls -laR "$WORK" >> "$SUMMARY"
pack
cat "$SUMMARY"
