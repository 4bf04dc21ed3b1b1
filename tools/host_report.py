#!/usr/bin/env python3
"""host_report.py - tools/host_sampler.c's samples as shares of the wall clock by function.

    tools/host_report.py SAMPLES BINARY [--lib NAME=PATH ...] [--callers FUNCTION] [--top N]

SAMPLES is the sampler's file; BINARY the dsrt executable that ran (or an unstripped copy of it:
the same build), whose addresses addr2line names. A shared library's frames are named by its file
unless --lib gives a copy of it (e.g. the GPU machine's libc.so.6), whose dynamic symbols nm lists.
Prints the samples' count, then each function's self share (the sampled instruction was in it) and
inclusive share (it was on the stack), largest first; --callers F adds the call chains that led to F.
The first two frames of a sample are the handler and the signal trampoline, and are dropped.
"""
import argparse
import bisect
import collections
import subprocess
import sys


def read(path):
    maps, samples = [], []
    for line in open(path):
        if line.startswith("M "):
            fields = line[2:].split()
            if len(fields) >= 6:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                maps.append((lo, hi, int(fields[2], 16), fields[5]))
        elif line.startswith("S"):
            samples.append([int(x, 16) for x in line.split()[1:]][2:])
    return maps, samples


def dynamic_symbols(path):
    out = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True).stdout
    syms = sorted((int(f[0], 16), f[2].split("@")[0]) for f in (l.split() for l in out.splitlines()) if len(f) == 3)
    return [a for a, _ in syms], [n for _, n in syms]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("samples")
    ap.add_argument("binary")
    ap.add_argument("--lib", action="append", default=[], help="NAME=PATH: symbols of a library")
    ap.add_argument("--callers", help="print the call chains into this function")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    maps, samples = read(args.samples)
    if not samples:
        sys.exit("host_report: no samples in %s (was sampling on?)" % args.samples)
    libs = {}
    for spec in args.lib:
        name, path = spec.split("=", 1)
        libs[name] = dynamic_symbols(path)
    exe = args.binary.split("/")[-1]

    def place(addr):
        for lo, hi, off, path in maps:
            if lo <= addr < hi:
                return path.split("/")[-1], addr - lo + off
        return "?", addr

    # the executable's addresses in one addr2line call (the return address minus one: the call)
    placed = {a: place(a) for s in samples for a in s}
    wanted = sorted({off for lib, off in placed.values() if lib == exe})
    names = {}
    if wanted:
        out = subprocess.run(["addr2line", "-f", "-C", "-e", args.binary] + ["%x" % (o - 1) for o in wanted],
                             capture_output=True, text=True).stdout.splitlines()
        for i, off in enumerate(wanted):
            names[off] = out[2 * i].split("(")[0] if 2 * i < len(out) else "?"

    def name(addr):
        lib, off = placed[addr]
        if lib == exe:
            return names.get(off, "?")
        if lib in libs:
            addrs, syms = libs[lib]
            i = bisect.bisect_right(addrs, off) - 1
            return "%s:%s" % (lib, syms[i] if i >= 0 else "?")
        return lib

    stacks = [[name(a) for a in s] for s in samples if s]
    n = len(stacks)
    own, anywhere = collections.Counter(), collections.Counter()
    for frames in stacks:
        own[frames[0]] += 1
        for f in set(frames):
            anywhere[f] += 1
    print("%d samples" % n)
    print("self:")
    for f, c in own.most_common(args.top):
        print("%6.1f%%  %s" % (100.0 * c / n, f))
    print("inclusive:")
    for f, c in anywhere.most_common(args.top):
        print("%6.1f%%  %s" % (100.0 * c / n, f))
    if args.callers:
        chains = collections.Counter()
        for frames in stacks:
            if args.callers in frames:
                i = frames.index(args.callers)
                chains[" < ".join(frames[i:i + 6])] += 1
        print("callers of %s:" % args.callers)
        for chain, c in chains.most_common(args.top):
            print("%6.1f%%  %s" % (100.0 * c / n, chain))


main()
