#!/bin/sh
# test_timeline.sh - tools/timeline_report.py on records written here, as tools/kernel_timeline.c
# writes them: two steps parted by a synchronize, the first with a kernel on an aux stream inside
# the main stream's busy time and 0.5 us idle before its second kernel, whose launch call returned
# after the GPU ran dry. Checked: each step's kernels, span, busy and idle time; with the launch
# calls (A lines) the host's issue time and the idle time marked as waiting for it; without them,
# no host columns; the last step's kernels summed by name; an empty file fails, saying so. Run by
# make test; no GPU needed.
passed=0; failed=0
dir=$(mktemp -d)
ok() { passed=$((passed + 1)); }
bad() { failed=$((failed + 1)); echo "FAIL $1"; cat "$dir/report.txt"; }
{
    echo "K 1000 2000 1 7 4 1 _Z3fooi"
    echo "K 2500 3000 2 7 1 1 _Z3barv"
    echo "K 2600 2900 3 9 2 1 _Z3bazv"
    echo "S 3100"
    echo "K 5000 6000 4 7 8 1 _Z3fooi"
    echo "S 6100"
} >"$dir/kernels.txt"
{
    cat "$dir/kernels.txt"
    echo "A 900 950 1 430"
    echo "A 1100 2700 2 430"
    echo "A 1200 1300 3 430"
    echo "A 4900 4950 4 430"
} >"$dir/host.txt"
report() { python3 tools/timeline_report.py "$1" >"$dir/report.txt" 2>&1; }
# step, kernels, span, busy, idle (us)
if report "$dir/kernels.txt" && grep -Eq '^ +1 +3 +2\.0 +1\.5 +0\.5$' "$dir/report.txt" &&
    grep -Eq '^ +2 +1 +1\.0 +1\.0 +0\.0$' "$dir/report.txt"; then ok; else bad "steps, busy and idle without the host's calls"; fi
if grep -q "issue us" "$dir/report.txt"; then bad "host columns without A lines"; else ok; fi
# the last step's kernel list: its one kernel, named, with its grid
if grep -Eq '^ +0\.0 +1\.0 +1\.0 +0\.0 +M .*foo.* \[8\]$' "$dir/report.txt"; then ok; else bad "the last step's kernels"; fi
# with the launch calls: issue 900 -> 2700 ns, the 0.5 us gap before bar waited for its call
if report "$dir/host.txt" && grep -Eq '^ +1 +3 +2\.0 +1\.5 +0\.5 +1\.8 +0\.5$' "$dir/report.txt" &&
    grep -Eq '^ +2 +1 +1\.0 +1\.0 +0\.0 +0\.1 +0\.0$' "$dir/report.txt"; then ok; else bad "the host's issue time and the idle it caused"; fi
# the last step summed by name, the longest first: foo twice (1.0 + 0.5 us), bar once (0.3)
{
    echo "K 1000 2000 1 7 4 1 _Z3fooi"
    echo "K 2000 2300 2 7 1 1 _Z3barv"
    echo "K 2300 2800 3 7 4 1 _Z3fooi"
} >"$dir/sums.txt"
if report "$dir/sums.txt" && grep -A2 "by name" "$dir/report.txt" | tail -2 | tr -s ' ' | tr '\n' '|' |
    grep -Eq '^ 1\.5 2 foo[^|]*\| 0\.3 1 bar'; then ok; else bad "the last step's kernels summed by name"; fi
: >"$dir/empty.txt"
if report "$dir/empty.txt"; then bad "an empty record file passes"; elif grep -q "no kernel recorded" "$dir/report.txt"; then ok; else bad "an empty record file's message"; fi
rm -rf "$dir"
echo "timeline: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
