#!/bin/sh
# test_check_ptxas.sh - tools/check_ptxas.sh, the build's check that the tensor-core kernels do
# not spill and that no kernel's wgmmas are serialised, on ptxas -v -warn-spills logs written here:
# it fails on a guarded kernel's spill (and names it) and on ptxas's C7520, passes other kernels'
# spills and the per-function resource lines without showing them, and shows every other message.
# Run by make test; no GPU needed.
passed=0; failed=0
log=$(mktemp); err=$(mktemp)
spill() { echo "ptxas warning : Registers are spilled to local memory in function '$1', 20 bytes spill stores, 44 bytes spill loads"; }
check() { # check NAME EXPECTED_STATUS PATTERN_IN_STDERR [PATTERN_NOT_IN_STDERR]
    tools/check_ptxas.sh "$log" 2>"$err"; st=$?
    if [ "$st" -eq "$2" ] && { [ -z "$3" ] || grep -q -- "$3" "$err"; } && { [ -z "$4" ] || ! grep -q -- "$4" "$err"; }; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1)); echo "FAIL $1: status $st (expected $2), stderr:"; cat "$err"
    fi
}
{ spill _Z11gemv_kernelILi2ELi8EEv8GemvArgs; echo "kernels/x.cu(3): warning: something else"; } >"$log"
check "another kernel's spill passes, unshown; other messages shown" 0 "something else" "gemv_kernel"
spill _Z14moe_mma_kernelILi1EEv22dsrtk_moe_project_argsi >"$log"
check "the MoE projection's spill fails" 1 "moe_mma_kernel"
{ echo "note"; spill _Z15bf16_mma_kernelILi4ELi1EEv11Bf16MmaArgs; } >"$log"
check "the LM head kernel's spill fails" 1 "a decode-path tensor-core kernel spills"
spill _Z15mma_gemv_kernelILi1ELi4ELb1EEv11MmaGemvArgs >"$log"
check "the FP8/FP4 GEMV's spill fails" 1 "mma_gemv_kernel"
spill _Z19not_moe_mma_kernelv >"$log"
check "a name that only contains a guarded one passes" 0 "" "not_moe"
spill _Z23moe_prefill_gemm_kernelPK16dsrtk_moe_matrixPKiS3_iiPKtlPtl >"$log"
check "the prefill expert GEMM's spill fails" 1 "moe_prefill_gemm_kernel"
{ echo "ptxas info    : 0 bytes gmem"; echo "ptxas info    : Compiling entry function '_Z3fooi' for 'sm_90a'"
  echo "ptxas info    : Function properties for _Z3fooi"; echo "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"
  echo "ptxas info    : Used 127 registers, used 1 barriers"; echo "ptxas info    : Compile time = 1.5 ms"; } >"$log"
check "ptxas -v's resource lines pass, unshown" 0 "" "."
echo "ptxas info    : (C7520) Potential Performance Loss: wgmma.mma_async instructions are serialized due to program dependence on compiler-inserted WG.AR in divergent path in the function '_Z3fooi'" >"$log"
check "serialised wgmmas fail, and are shown" 1 "C7520"
: >"$log"
check "an empty log passes" 0 ""
rm -f "$log" "$err"
echo "ptxas: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
