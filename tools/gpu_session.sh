#!/bin/sh
# gpu_session.sh - everything one visit to the GPU machine does, over a build/ made elsewhere:
# the GPU tests, then the benchmarks; logs land in $OUT (or build/gpu-logs) and the tables print last.
#
#   tools/gpu_session.sh [tests|bench|all]   (default all)
out=${OUT:-build/gpu-logs}
mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
what=${1:-all}
status=0
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv,noheader | tee "$out/gpu.txt"
if [ "$what" != bench ]; then
    make -s test-gpu >"$out/test-gpu.log" 2>&1 || status=1
    grep -E "FAIL|failed|Error|error" "$out/test-gpu.log" | grep -v " 0 failed" | head -60
    tail -3 "$out/test-gpu.log"
fi
if [ "$what" != tests ]; then
    make -s bench >"$out/bench.log" 2>&1 || status=1
    tail -60 "$out/bench.log"
fi
exit $status
