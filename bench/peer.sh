#!/usr/bin/env bash
# Runs bench/peer.py (the hand-written polars + connectorx peer of callrecon's rematch) in a
# virtual environment of its own under ${TMPDIR:-/tmp}, created and filled from PyPI on first use.
#
#   bench/peer.sh URL JOB_FILE SINCE UNTIL
#   bench/peer.sh                           # only makes sure the venv is there
set -euo pipefail
venv="${TMPDIR:-/tmp}/callrecon-peer-venv"
if ! "$venv/bin/python" -c 'import polars, connectorx, pyarrow' 2>/dev/null; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet polars==2.1.0 connectorx==0.4.6 pyarrow==26.0.1 >&2
fi
[ $# -eq 0 ] && exit 0
exec "$venv/bin/python" "$(dirname "$0")/peer.py" "$@"
