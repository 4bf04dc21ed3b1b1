#!/bin/sh
# test_host_profile.sh - tools/host_sampler.c and tools/host_report.py on the CPU: a dsrt script that
# loops in Lua, then (between the SIGUSR1 and SIGUSR2 it sends itself) multiplies matrices, then
# loops in Lua again. The report must hold the window's samples (wall clock at 1 kHz: ~300), name
# the GEMM (dsrt_gemm_f32) inclusive in most of them, the Lua VM's own code in few (the loops outside
# the window are not sampled), and say when a run took none. Run by make test; no GPU needed.
build=${BUILD:-build}
passed=0; failed=0
out=$(mktemp -d)
ok() { passed=$((passed + 1)); }
bad() { failed=$((failed + 1)); echo "FAIL $1"; }
cat >"$out/work.lua" <<'LUA'
local dsrt = require "dsrt"
local core = require "dsrt.core"
local function spin(seconds) local t = core.wall_time(); local x = 0; while core.wall_time() - t < seconds do x = x + 1 end end
spin(0.2)
os.execute("kill -USR1 $PPID")
local a, t = dsrt.randn({ 384, 384 }, { seed = 1 }), core.wall_time()
while core.wall_time() - t < 0.3 do a:matmul(a):close() end
os.execute("kill -USR2 $PPID")
spin(0.2)
LUA
run() { # run WAIT: the sampler preloaded, samples to $out/samples.txt
    OMP_NUM_THREADS=1 LD_PRELOAD="$PWD/$build/host_sampler.so" DSRT_HOST_SAMPLES="$out/samples.txt" \
        DSRT_HOST_SAMPLES_WAIT=$1 DSRT_HOST_SAMPLE_US=1000 "$build/dsrt" "$out/work.lua"
}
if run 1 && python3 tools/host_report.py "$out/samples.txt" "$build/dsrt" --callers dsrt_gemm_f32 >"$out/report.txt"; then
    n=$(sed -n 's/^\([0-9]*\) samples$/\1/p' "$out/report.txt")
    gemm=$(sed -n '/^inclusive:/,$ s/^ *\([0-9.]*\)%  dsrt_gemm_f32$/\1/p' "$out/report.txt" | head -1)
    lua=$(sed -n '/^self:/,/^inclusive:/ s/^ *\([0-9.]*\)%  luaV_execute$/\1/p' "$out/report.txt" | head -1)
    [ "${n:-0}" -ge 150 ] && [ "${n:-0}" -le 450 ] && ok || bad "the window's samples: ${n:-none} (expected ~300)"
    awk "BEGIN { exit !(${gemm:-0} >= 60) }" && ok || bad "dsrt_gemm_f32 inclusive ${gemm:-0}% (expected most)"
    grep -q "dsrt_gemm_f32 < .* < l_matmul" "$out/report.txt" && ok || bad "the GEMM's call chain reaches the binding, l_matmul"
    awk "BEGIN { exit !(${lua:-0} < 20) }" && ok || bad "the Lua loops outside the window sampled: luaV_execute self ${lua:-0}%"
else
    bad "a sampled run and its report"; cat "$out/report.txt" 2>/dev/null
fi
# sampling never switched on: the report says so and fails
sed -i 's/^os.execute("kill -USR1 $PPID")$//' "$out/work.lua"
run 1 && ! python3 tools/host_report.py "$out/samples.txt" "$build/dsrt" >/dev/null 2>"$out/err.txt" &&
    grep -q "no samples" "$out/err.txt" && ok || bad "a run with sampling off: 'no samples'"
rm -rf "$out"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
