#!/bin/sh
# profile_stalls.sh - where a kernel's warps wait, instruction by instruction: ncu's source counters
# (SASS with warp-state samples) over one launch of the kernels matching REGEX inside one decode
# step of the Flash slice (scripts/profile_decode.lua), summarised: the stall reasons, the
# instructions that drew the most samples, and every local-memory instruction that executed. A
# spill's reload is an LDL that queues behind the global loads issued before it: that is how
# moe.cu's mma_project was found waiting for the loads it had just issued. Over a build made
# elsewhere, on the GPU machine:
#
#   BUILD=build-gpu tools/profile_stalls.sh REGEX [launches to skip] [script]
#   e.g. tools/profile_stalls.sh '^moe_mma_kernel' 0     (writes $OUT or build/gpu-logs/stalls.csv)
#
# SAMPLING=0..31 sets ncu's sampling interval (2^(5 + n) cycles; default auto): a one-block kernel of
# a few microseconds draws a dozen samples at auto, a few hundred at 0.
out=${OUT:-build/gpu-logs}
build=${BUILD:-build}
regex=${1:?usage: tools/profile_stalls.sh REGEX [skip] [script]}
mkdir -p "$out"
ncu --profile-from-start off --clock-control none --cache-control none -k "regex:$regex" --launch-skip "${2:-0}" -c 1 \
    --warp-sampling-interval "${SAMPLING:-auto}" \
    --section WarpStateStats --section SourceCounters --page source --csv --print-source sass \
    "$build/dsrt" "${3:-scripts/profile_decode.lua}" >"$out/stalls.csv" 2>"$out/stalls.log" ||
    { tail -20 "$out/stalls.log"; exit 1; }
python3 - "$out/stalls.csv" <<'PY'
import csv, sys
lines = open(sys.argv[1]).read().splitlines()
starts = [i for i, l in enumerate(lines) if l.startswith('"Address"')]
if not starts:
    sys.exit("profile_stalls: ncu profiled no kernel (check the regex and the skip count)")
num = lambda x: float(x.replace(",", "")) if x.replace(",", "").replace(".", "", 1).isdigit() else 0.0
for k, first in enumerate(starts):
    last = starts[k + 1] if k + 1 < len(starts) else len(lines)
    rows = list(csv.reader(lines[first:last]))
    head, rows = rows[0], [r for r in rows[1:] if len(r) == len(rows[0])]
    col = {name: i for i, name in enumerate(head)}
    samples, executed, source = col["Warp Stall Sampling (All Samples)"], col["Instructions Executed"], col["Source"]
    total = sum(num(r[samples]) for r in rows) or 1.0
    print(lines[first - 1][:120])
    print("%d samples, %d warp instructions executed" % (total, sum(num(r[executed]) for r in rows)))
    stalls = [(sum(num(r[i]) for r in rows), name) for name, i in col.items() if name.startswith("stall_") and "Not Issued" not in name]
    print("stalls: " + ", ".join("%s %.0f%%" % (name[6:], 100 * v / total) for v, name in sorted(stalls, reverse=True)[:8]))
    print("%8s %10s  %s" % ("samples", "executed", "instruction (most samples first)"))
    for r in sorted(rows, key=lambda r: -num(r[samples]))[:12]:
        print("%8d %10d  %s" % (num(r[samples]), num(r[executed]), r[source].strip()[:90]))
    local = [(num(r[executed]), r[source].strip()) for r in rows if ("LDL" in r[source] or "STL" in r[source]) and num(r[executed]) > 0]
    print("local memory: %d executions%s" % (sum(n for n, _ in local), "" if not local else ", the most:"))
    for n, text in sorted(local, reverse=True)[:6]:
        print("%19d  %s" % (n, text[:90]))
PY
