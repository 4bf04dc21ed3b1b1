#!/usr/bin/env bash
# Runs each argument as a test command, shows its output, and closes with the sum of the
# `N passed, N failed` lines they print. Fails if any command fails or prints no such line.
passed=0; failed=0; status=0
for cmd in "$@"; do
  out=$(mktemp)
  bash -c "$cmd" 2>&1 | tee "$out"
  rc=${PIPESTATUS[0]}
  line=$(grep -E '^[A-Za-z]*:? ?[0-9]+ passed, [0-9]+ failed' "$out" | tail -n 1)
  rm -f "$out"
  if [ -z "$line" ]; then echo "total: '$cmd' printed no result line (exit $rc)"; failed=$((failed+1)); status=1; continue; fi
  p=$(grep -oE '[0-9]+ passed' <<<"$line" | grep -oE '[0-9]+'); f=$(grep -oE '[0-9]+ failed' <<<"$line" | grep -oE '[0-9]+')
  passed=$((passed+p)); failed=$((failed+f))
  [ "$rc" -eq 0 ] || status=1
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && exit $status || exit 1
