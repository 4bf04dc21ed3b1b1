#!/bin/sh
# check_spills.sh LOG - what nvcc said compiling one kernel file (ptxas -warn-spills), shown without
# the spill warnings of kernels allowed to spill, and a failure when a decode-path tensor-core kernel
# spills. Those kernels keep two steps of weight loads in flight in registers; a spilled counter's
# reload queues behind the step's own loads, and the warp waits for the loads it has just issued
# (moe.cu's mma_project: 14% of the MoE projection's stall samples on one such reload, ncu, H200).
# ptxas moves them across the 128-register line on small edits, so the build checks every time.
log=$1
guarded="'_Z[0-9]+(moe_mma_kernel|mma_gemv_kernel|bf16_mma_kernel|mma_project)"
grep -v "Registers are spilled to local memory" "$log" >&2
if grep -E "Registers are spilled to local memory in function $guarded" "$log" >&2; then
    echo "check_spills: a decode-path tensor-core kernel spills registers (above); keep it within its registers" >&2
    exit 1
fi
exit 0
