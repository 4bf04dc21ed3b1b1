#!/bin/sh
# host_profile.sh - where the host's wall clock goes in decode steps of the Flash slice, on the GPU
# machine (no perf or nsys there): scripts/profile_host.lua under tools/host_sampler.c, sampling
# only its decode steps. Writes the samples and a copy of the machine's libc (to name its frames)
# to $OUT (or build/gpu-logs); the report is made where the build was (addr2line, nm):
#
#   there: BUILD=build-gpu tools/host_profile.sh [steps] [context]
#   here:  tools/host_report.py FILES/host_samples.txt build/dsrt --lib libc.so.6=FILES/libc.so.6
out=${OUT:-build/gpu-logs}
build=${BUILD:-build}
mkdir -p "$out"
LD_PRELOAD="$PWD/$build/host_sampler.so" DSRT_HOST_SAMPLES="$out/host_samples.txt" DSRT_HOST_SAMPLES_WAIT=1 \
    "$build/dsrt" scripts/profile_host.lua "$@" || exit 1
for lib in /lib/x86_64-linux-gnu/libc.so.6 /usr/lib/x86_64-linux-gnu/libc.so.6; do
    [ -f "$lib" ] && { cp "$lib" "$out/"; break; }
done
