#!/usr/bin/env bash
# The whole test suite against a real PostgreSQL (each test gets its own database).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/pg.sh
export DATABASE_URL="${DATABASE_URL:-$CALLRECON_PG/postgres}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/callrecon-target}"
cargo test --all-targets "$@"
