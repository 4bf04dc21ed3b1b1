#!/usr/bin/env python3
"""timeline_report.py - tools/kernel_timeline.c's records as a decode step's timeline.

    tools/timeline_report.py RECORDS

RECORDS holds K (kernel), A (runtime call, optional) and S (synchronize) lines, all in one
timebase (kernel_timeline.c says what each holds). The steps are parted where a synchronize
returned: a step's kernels all start before the wait that ends it returns, the next step's after.
Per step: the span from the first kernel's start to the last one's end, the GPU's busy time (the
union of the kernels on every stream) and its idle time inside the span; with A lines, the host's
issue time (its first launch call's start to its last one's return) and the idle time the GPU spent
waiting for a launch call that had not yet returned. Then the last step's kernels, one a line, with
the gap the GPU sat idle before each (H: waiting for its launch call), and summed by name (time,
calls), the longest first. Names go through c++filt where binutils is installed. tools/timeline.sh
runs it; tests/tools/test_timeline.sh checks it.
"""
import sys, re, subprocess, bisect
kernels, api, syncs = [], {}, []
for line in open(sys.argv[1]):
    f = line.split(None, 7)
    if f[0] == "K":
        kernels.append(dict(start=int(f[1]), end=int(f[2]), corr=int(f[3]), stream=int(f[4]), grid=int(f[5]),
                            name=f[7].strip()))
    elif f[0] == "A":
        api[int(f[3])] = (int(f[1]), int(f[2]))
    elif f[0] == "S":
        syncs.append(int(f[1]))
if not kernels:
    sys.exit("timeline: no kernel recorded (an empty profiled region, or no CUPTI)")
# a step's kernels all start before the synchronize that ends it returns, the next step's after
syncs.sort()
steps = {}
for k in kernels:
    steps.setdefault(bisect.bisect_left(syncs, k["start"]), []).append(k)
steps = [steps[i] for i in sorted(steps)]
mangled = sorted({k["name"] for st in steps for k in st})
try:  # c++filt where binutils is installed, the mangled names otherwise
    plain = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True).stdout.splitlines()
except OSError:
    plain = mangled
short = {m: re.sub(r"^void ", "", p.replace("(anonymous namespace)::", "").split("(")[0])[:44] for m, p in zip(mangled, plain)}
for st in steps:
    for k in st:
        k["name"] = short.get(k["name"], k["name"][:44])
host = bool(api)
us = lambda ns: ns / 1e3
print("%4s %7s %9s %9s %9s" % ("step", "kernels", "span us", "busy us", "idle us") +
      (" %9s %11s" % ("issue us", "idle: host") if host else ""))
for i, st in enumerate(steps):
    st.sort(key=lambda k: k["start"])
    for k in st:
        k["issued"] = api.get(k["corr"], (0, 0))[1]
    cover, busy, idle, idle_host = st[0]["start"], 0, 0, 0
    for k in st:
        k["gap"] = max(0, k["start"] - cover)
        k["waited"] = host and k["gap"] > 0 and k["issued"] > cover  # the launch call returned after the GPU ran dry
        idle += k["gap"]
        idle_host += k["gap"] if k["waited"] else 0
        busy += max(0, k["end"] - max(cover, k["start"]))
        cover = max(cover, k["end"])
    row = "%4d %7d %9.1f %9.1f %9.1f" % (i + 1, len(st), us(cover - st[0]["start"]), us(busy), us(idle))
    if host:
        first = min((api[k["corr"]][0] for k in st if k["corr"] in api), default=st[0]["start"])
        row += " %9.1f %11.1f" % (us(max(k["issued"] for k in st) - first), us(idle_host))
    print(row)
st = steps[-1]
begin, main = st[0]["start"], st[0]["stream"]
print("\nthe last step's kernels (us from its first kernel's start; gap: the GPU idle before it%s):" %
      ("; H: waiting for its launch call" if host else ""))
print("%8s %8s %6s %6s %2s  %s" % ("start", "end", "dur", "gap", "", "kernel [grid], M main stream, a aux"))
for k in st:
    print("%8.1f %8.1f %6.1f %6.1f %2s  %s %s [%d]" % (us(k["start"] - begin), us(k["end"] - begin), us(k["end"] - k["start"]),
          us(k["gap"]), "H" if k["waited"] else "", "M" if k["stream"] == main else "a", k["name"], k["grid"]))
print("\nthe last step's kernels by name (us in all, calls):")
sums = {}
for k in st:
    t, n = sums.get(k["name"], (0, 0))
    sums[k["name"]] = (t + k["end"] - k["start"], n + 1)
for name, (t, n) in sorted(sums.items(), key=lambda e: (-e[1][0], e[0])):
    print("%8.1f %5d  %s" % (us(t), n, name))
