#!/bin/sh
# timeline.sh - decode steps of the Flash slice as they really run on the GPU machine (CUPTI's
# activity records, tools/kernel_timeline.c, built beside dsrt), with programmatic dependent launch
# and the aux streams in effect, where ncu serialises kernels and times each alone. Per step: its
# span from the first kernel's start to the last one's end, the GPU's busy time (kernels on any
# stream) and its idle time inside the span; then the last step's kernels, one a line, with the gap
# the GPU sat idle before each, and summed by name (tools/timeline_report.py). With TIMELINE_HOST=1
# the host's launch calls are recorded too (kernel_timeline.c says what they cost): each step then
# also shows the host's issue time, and idle time the GPU spent waiting for a launch call that had
# not returned is marked H. The steps are parted where the host's wait for the GPU returned (each
# profiled step ends with one; a profiled region a step, as before, left the GPU idle 0.6-4.9 ms a
# step). Run on the H200 machine (2026-11-29); the report is tested here
# (tests/tools/test_timeline.sh). Over a build made elsewhere, on the GPU machine:
#
#   BUILD=build-gpu tools/timeline.sh [profile_decode.lua options]   (default --steps 4 --plain)
#   e.g. tools/timeline.sh --steps 4 --positions 3                   (a verify's forward, drafting)
out=${OUT:-build/gpu-logs}
build=${BUILD:-build}
mkdir -p "$out"
[ $# -gt 0 ] || set -- --steps 4 --plain
CUDA_INJECTION64_PATH="$PWD/$build/kernel_timeline.so" DSRT_TIMELINE="$out/timeline.txt" \
    DSRT_TIMELINE_HOST="${TIMELINE_HOST:-0}" "$build/dsrt" scripts/profile_decode.lua "$@" >"$out/timeline.log" 2>&1 ||
    { tail -20 "$out/timeline.log"; exit 1; }
grep "profile_decode:" "$out/timeline.log"
python3 tools/timeline_report.py "$out/timeline.txt"
