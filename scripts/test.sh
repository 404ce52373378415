#!/usr/bin/env bash
# The whole test suite against a real PostgreSQL (each test gets its own database).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/pg.sh
export DATABASE_URL="${DATABASE_URL:-$CALLRECON_PG/postgres}"
# The report's HTML and the review desk are tested in a real headless browser (the desk's
# journeys driven through chromedriver).
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  echo "test.sh: installing Debian's chromium and chromium-driver for the browser tests" >&2
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >&2
fi
# The alert rules in docs/ are checked with promtool, which Debian's prometheus package ships.
if ! command -v promtool >/dev/null; then
  echo "test.sh: installing Debian's prometheus for promtool (alert rules, metrics lint)" >&2
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >&2
fi
# The pooler tests put Debian's PgBouncer in front of the test server (each test starts its own).
if [ ! -x /usr/sbin/pgbouncer ]; then
  echo "test.sh: installing Debian's pgbouncer for the connection-pooler tests" >&2
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends pgbouncer >&2
fi
# The spreadsheet round trip is tested in LibreOffice Calc, headless (Debian's libreoffice-calc-nogui).
if ! command -v soffice >/dev/null; then
  echo "test.sh: installing Debian's libreoffice-calc-nogui for the spreadsheet round trip" >&2
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends libreoffice-calc-nogui >&2
fi
# The OpenAPI document is checked with schemathesis (PyPI) against a live server: installed into a
# virtualenv under the cache dir once (the test runs this script itself too).
bash scripts/schemathesis.sh >/dev/null
# The desk's pages are checked with axe-core (npm) in the browser: installed under the cache dir
# once (the test runs this script itself too); npm from Debian's package.
if ! command -v npm >/dev/null; then
  echo "test.sh: installing Debian's npm for axe-core (the desk's accessibility checks)" >&2
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends npm >&2
fi
bash scripts/axe.sh >/dev/null
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/callrecon-target}"
cargo test --all-targets "$@"
