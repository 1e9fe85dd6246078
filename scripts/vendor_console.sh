#!/usr/bin/env bash
# Copies the web console's frontend library (htm + Preact in one ESM file, htm/preact/standalone) from npm into
# inhouse/console/static/vendor/. Run by hand when the pin in inhouse/console/package.json changes; the copied
# file is committed, so serving the console needs neither npm nor the internet.
set -euo pipefail
cd "$(dirname "$0")/../inhouse/console"
npm ci --ignore-scripts --no-audit --no-fund --silent 2>/dev/null || npm install --ignore-scripts --no-audit --no-fund --silent
mkdir -p static/vendor
cp node_modules/htm/preact/standalone.module.js static/vendor/htm-preact-standalone.js
cp node_modules/htm/LICENSE static/vendor/htm-LICENSE.txt
rm -rf node_modules
echo "vendored htm $(node -p "require('./package-lock.json').packages['node_modules/htm'].version") into static/vendor/"
