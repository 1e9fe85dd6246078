#!/usr/bin/env bash
# Makes sure PostgreSQL and Redis server binaries are installed (Debian packages), for the test suite,
# which starts its own throwaway servers on loopback, and promtool (Debian's prometheus package), which
# checks deploy/prometheus, and Chromium (Debian's chromium, with a CJK font for the Chinese UI) for the web
# console's browser tests, and a C compiler (gcc), which builds the CPU attention kernels the tests check.
# Idempotent: installs nothing when all are there.
set -euo pipefail

have_pg() { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }
have_redis() { command -v redis-server >/dev/null 2>&1; }
have_promtool() { command -v promtool >/dev/null 2>&1; }
have_chromium() { test -x /usr/bin/chromium; }
have_cjk_font() { test -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc; }
have_cc() { command -v cc >/dev/null 2>&1; }

missing=()
have_pg || missing+=(postgresql)
have_redis || missing+=(redis-server)
have_promtool || missing+=(prometheus)
have_chromium || missing+=(chromium)
have_cjk_font || missing+=(fonts-wqy-microhei)
have_cc || missing+=(gcc libgomp1)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/services.sh: need ${missing[*]}; run: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "installing ${missing[*]} (Debian packages) for the test suite" >&2
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
# the packages start system-wide services; the tests run their own servers, so stop these
(service redis-server stop || true) >/dev/null 2>&1
(service postgresql stop || true) >/dev/null 2>&1
(service prometheus stop || true) >/dev/null 2>&1
have_pg && have_redis && have_promtool && have_chromium && have_cjk_font && have_cc
