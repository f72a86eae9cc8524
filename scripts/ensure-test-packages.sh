#!/usr/bin/env bash
# Debian packages the tests drive (never a binary a test downloads itself):
#   chromium                  the dashboard's browser test
#   varnish, varnish-modules  the edge tier's tests (Varnish 7 with the xkey vmod)
#   memcached                 the memcached door's reference server (bench and tests)
#   libmemcached-tools        memccp/memccat/memcrm/memcslap: real memcached clients in the tests
#   redis-server              redis-cli and the binary that runs Cluster nodes and Sentinels
# Installs only what is missing, when we are root with apt; otherwise says what is needed.
set -euo pipefail
missing=()
need() { # need PACKAGE COMMAND-OR-FILE
  if [[ $2 == /* ]]; then [[ -e $2 ]] || missing+=("$1")
  else command -v "$2" >/dev/null 2>&1 || missing+=("$1"); fi
}
need chromium chromium
need varnish varnishd
need varnish-modules /usr/lib/x86_64-linux-gnu/varnish/vmods/libvmod_xkey.so
need memcached memcached
need libmemcached-tools memccp
need redis-server redis-server
[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian packages for the tests: ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "the tests need Debian packages: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
