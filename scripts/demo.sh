#!/usr/bin/env bash
# The demo end to end: a PostgreSQL (found or started), the sample data, two runs, the report.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/pg.sh
export DATABASE_URL="${DATABASE_URL:-$CALLRECON_PG/callrecon}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/callrecon-target}"
cargo run --quiet -- demo "$@"
