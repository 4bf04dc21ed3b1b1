#!/bin/sh
# pack_gpu.sh - what a GPU visit needs from a build made here, small enough to travel: stripped
# programs and the tokenizer cache in build-gpu/ (run make first). On the GPU machine:
#   BUILD=build-gpu tools/gpu_session.sh
set -e
mkdir -p build-gpu
cp build/dsrt build/test_c build-gpu/
strip build-gpu/dsrt build-gpu/test_c
rm -rf build-gpu/cache && cp -a build/cache build-gpu/cache
du -sh build-gpu
