#!/usr/bin/env bash
# The browser test drives Debian's Chromium (never a browser a test downloads itself).
# Install it when missing and we are root with apt; otherwise say what is needed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium for the browser test" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
  echo "the browser test needs Debian's chromium: sudo apt-get install chromium" >&2
  exit 1
fi
