#!/usr/bin/env bash
# Prints the path of axe-core's axe.min.js (npm), installing it first when missing: into a
# directory under the cache dir, pinned, so a fresh machine (CI) gets the same version. The
# review desk's browser tests (tests/it/review.rs) inject it into headless Chromium to check
# every desk page and report.html for WCAG 2.1 AA violations.
set -euo pipefail
version=4.11.0
dir="${CALLRECON_AXE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/callrecon/axe-core-$version}"
if [ ! -f "$dir/node_modules/axe-core/axe.min.js" ]; then
  echo "axe.sh: installing axe-core $version into $dir" >&2
  mkdir -p "$dir"
  npm install --silent --no-audit --no-fund --prefix "$dir" "axe-core@$version" >&2
fi
echo "$dir/node_modules/axe-core/axe.min.js"
