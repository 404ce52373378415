#!/usr/bin/env bash
# Prints the path of a schemathesis binary (PyPI), installing it first when missing: into a
# virtualenv under the cache dir, pinned, so a fresh machine (CI) gets the same version. The
# OpenAPI test (tests/it/openapi.rs) runs it against a live `callrecon serve`.
set -euo pipefail
version=4.32.5
venv="${CALLRECON_SCHEMATHESIS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/callrecon/schemathesis-$version}"
if [ ! -x "$venv/bin/schemathesis" ]; then
  echo "schemathesis.sh: installing schemathesis $version into $venv" >&2
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$version" >&2
fi
echo "$venv/bin/schemathesis"
