#!/bin/sh
# profile_decode.sh - the kernels of one decode step of the Flash slice on the GPU machine, timed by
# ncu at the card's own clocks with warm caches (--clock-control none --cache-control none), summed
# by kernel name, largest first, with the step's total. Over a build made elsewhere:
#
#   BUILD=build-gpu tools/profile_decode.sh [--context N] [--positions N]     (writes $OUT or build/gpu-logs/decode_kernels.csv)
out=${OUT:-build/gpu-logs}
build=${BUILD:-build}
mkdir -p "$out"
ncu --profile-from-start off --clock-control none --cache-control none --metrics gpu__time_duration.sum \
    --csv --page raw "$build/dsrt" scripts/profile_decode.lua "$@" >"$out/decode_kernels.csv" 2>"$out/decode_ncu.log" ||
    { tail -20 "$out/decode_ncu.log"; exit 1; }
grep "profile_decode:" "$out/decode_kernels.csv"
python3 - "$out/decode_kernels.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 5]
head = rows[0]
name_col, time_col = head.index("Kernel Name"), head.index("gpu__time_duration.sum")
total, by_name, count = 0.0, collections.Counter(), collections.Counter()
for r in rows[1:]:
    try:
        ns = float(r[time_col].replace(",", ""))
    except ValueError:
        continue  # the units row
    name = r[name_col].split("(")[0]
    by_name[name] += ns
    count[name] += 1
    total += ns
print("%10s %6s %5s  %s" % ("us", "share", "calls", "kernel"))
for name, ns in by_name.most_common():
    print("%10.1f %5.1f%% %5d  %s" % (ns / 1e3, 100 * ns / total, count[name], name))
print("%10.1f        %5d  kernels in the profiled forward" % (total / 1e3, sum(count.values())))
PY
