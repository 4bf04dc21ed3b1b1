#!/bin/sh
# check_ptxas.sh LOG - what nvcc said compiling one kernel file (ptxas -v -warn-spills), shown without
# ptxas's per-function resource lines and the spill warnings of kernels allowed to spill, and a
# failure on either of two things ptxas does quietly to the tensor-core kernels:
#   - a decode-path tensor-core kernel (or the prefill's expert GEMM) spills. Those kernels keep two
#     steps of weight loads in flight in registers; a spilled counter's reload queues behind the
#     step's own loads, and the warp waits for the loads it has just issued (moe.cu's mma_project:
#     14% of the MoE projection's stall samples on one such reload, ncu, H200). ptxas moves them
#     across the 128-register line on small edits, so the build checks every time.
#   - ptxas serialises a kernel's wgmmas (its C7520 "Potential Performance Loss", printed only
#     under -v): a wait after every wgmma, nothing overlaps the tensor cores (moe.cu's prefill
#     GEMM: 4.0 ms against 3.4 for the same code without a branch ptxas read as divergent).
log=$1
guarded="'_Z[0-9]+(moe_mma_kernel|moe_wg_kernel|moe_wg_route_kernel|mma_gemv_kernel|bf16_mma_kernel|mma_project|moe_prefill_gemm_kernel)"
grep -v -e "Registers are spilled to local memory" -e "^ptxas info *: \(Compiling entry\|Function properties\|Used \)" \
    -e "^ptxas info *: \(Compile time\|[0-9]* bytes gmem\)" -e "^    [0-9]* bytes stack frame" "$log" >&2
status=0
if grep -E "Registers are spilled to local memory in function $guarded" "$log" >&2; then
    echo "check_ptxas: a decode-path tensor-core kernel spills registers (above); keep it within its registers" >&2
    status=1
fi
if grep -q "wgmma.mma_async instructions are serialized" "$log"; then
    echo "check_ptxas: ptxas serialised a kernel's wgmmas (C7520 above); see tools/check_ptxas.sh" >&2
    status=1
fi
exit $status
