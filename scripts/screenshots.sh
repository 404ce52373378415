#!/usr/bin/env bash
# Regenerates docs/report.png, docs/review-queue.png and docs/review-event.png from the demo's
# data in headless Chromium (scripts/screenshots.py drives it through chromedriver), so the
# pictures in the guides show what this version prints. Works in a database of its own
# (callrecon_screenshots, dropped first) and a temporary copy of the demo job.
#
#   scripts/screenshots.sh            # then review and commit docs/*.png
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/pg.sh
server="${CALLRECON_PG:-${DATABASE_URL%/*}}"
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  echo "screenshots.sh: installing Debian's chromium and chromium-driver" >&2
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >&2
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/callrecon-target}"
cargo build --quiet
bin="$(cd "$CARGO_TARGET_DIR" && pwd)/debug/callrecon"
psql=$(command -v psql || ls /usr/lib/postgresql/*/bin/psql | sort -V | tail -n 1)
"$psql" -q "$server/postgres" -c 'drop database if exists callrecon_screenshots with (force)'
python3 scripts/screenshots.py "$bin" "$server/callrecon_screenshots"
"$psql" -q "$server/postgres" -c 'drop database if exists callrecon_screenshots with (force)'
