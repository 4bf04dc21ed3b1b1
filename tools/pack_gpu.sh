#!/bin/sh
# pack_gpu.sh - what a GPU visit needs from a build made here, small enough to travel (the device
# tool carries at most 64 MiB): the programs without debug info (dsrt keeps its symbols, for perf
# and tools/host_report.py), the host sampler and the kernel timeline's library, gzipped, and the
# tokenizer cache, in build-gpu/ (run make first). On the GPU machine:
#   tar -C build-gpu -xzf build-gpu/bin.tgz && BUILD=build-gpu DSRT_CACHE=$PWD/build-gpu/cache tools/gpu_session.sh
set -e
mkdir -p build-gpu/bin
cp build/dsrt build/test_c build/host_sampler.so build-gpu/bin/
[ -f build/kernel_timeline.so ] && cp build/kernel_timeline.so build-gpu/bin/
strip --strip-debug build-gpu/bin/dsrt; strip build-gpu/bin/test_c
tar -C build-gpu/bin -czf build-gpu/bin.tgz $(cd build-gpu/bin && ls)
rm -rf build-gpu/bin build-gpu/dsrt build-gpu/test_c build-gpu/host_sampler.so build-gpu/kernel_timeline.so
rm -rf build-gpu/cache && cp -a build/cache build-gpu/cache
du -sh build-gpu
