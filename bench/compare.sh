#!/usr/bin/env bash
# Times builds side by side, interleaved, on fresh copies of the database bench/nightly.sh
# prepares: for a change that must leave the nightly and the rematch as fast as they were.
#
#   bench/nightly.sh prepare              # once (later binaries migrate up; older ones forget
#                                         # the migrations they do not know, on their copy)
#   bench/compare.sh ROUNDS BIN [BIN...]  # e.g. 3 /tmp/callrecon-before target/release/callrecon
#
# Each round runs every binary in turn on its own fresh copy: `migrate` (untimed: a binary with a
# new migration applies it first), then the nightly (timed); then, on another fresh copy, the
# rematch of the 30 days under the changed rules bench/run.sh uses (timed). Prints every time and,
# per binary, the median of each, as a markdown table. Each nightly's log (JSON, debug level) is
# kept as $work/nightly-rROUND-bBINARY.log: `bench/stages.py < LOG` prints its timeline.
# PEER=1 also times the peer script (bench/peer.sh) in each round, on the prepared database
# (it only reads), over the same 30 days and changed rules as the rematch.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
[ $# -ge 2 ] || { echo "usage: bench/compare.sh ROUNDS BIN [BIN...]" >&2; exit 2; }
rounds="$1"; shift
tpl=callrecon_bench_nightly_$GEN_GROUPS
copy=callrecon_bench_compare_copy
work="${TMPDIR:-/tmp}/callrecon-compare"
mkdir -p "$work"
bench_jobs "$work"
exists=$(PSQL "$SERVER/postgres" -tAc "select count(*) from pg_database where datname = '$tpl'")
[ "$exists" = 1 ] || { echo "bench/compare.sh: no prepared database; run bench/nightly.sh prepare" >&2; exit 1; }

fresh() { fresh_copy "$tpl" "$copy" "$1"; }

[ "${PEER:-0}" = 1 ] && bench/peer.sh   # its venv, installed before anything is timed
results="$work/results.txt"
: > "$results"
for round in $(seq "$rounds"); do
  for i in $(seq 0 $(($# - 1))); do
    bins=("$@")
    bin="${bins[$i]}"
    fresh "$bin"
    read -r nightly _ < <(RUST_LOG=callrecon=debug python3 bench/measure.py "$bin" --log-format json \
      --database-url "$SERVER/$copy" run --job "$work/job.toml" 2> "$work/nightly-r$round-b$i.log")
    fresh "$bin"
    read -r rematch rss < <(python3 bench/measure.py "$bin" --database-url "$SERVER/$copy" rematch \
      --job "$work/job-changed.toml" --since 2026-10-01T00:00:00Z --until 2026-10-31T00:00:00Z)
    echo "round $round  binary $i ($bin)  nightly $nightly s  rematch $rematch s  rss $rss MiB" | tee -a "$results" >&2
  done
  if [ "${PEER:-0}" = 1 ]; then
    read -r peer _ < <(python3 bench/measure.py bench/peer.sh "$SERVER/$tpl" "$work/job-changed.toml" \
      2026-10-01T00:00:00Z 2026-10-31T00:00:00Z 2> "$work/peer-r$round.json")
    echo "round $round  peer script  rematch $peer s" | tee -a "$results" >&2
  fi
done
PSQL "$SERVER/postgres" -c "drop database if exists $copy"

python3 - "$results" "$@" <<'EOF'
import re, statistics, sys
lines = open(sys.argv[1]).read().splitlines()
print("| binary | nightly (each round) | nightly median | rematch (each round) | rematch median | rematch peak RSS (MiB) |")
print("| --- | --- | --- | --- | --- | --- |")
for i, b in enumerate(sys.argv[2:]):
    rows = [l for l in lines if f" binary {i} (" in l]
    n = [float(re.search(r"nightly ([0-9.]+)", l).group(1)) for l in rows]
    r = [float(re.search(r"rematch ([0-9.]+)", l).group(1)) for l in rows]
    m = [int(re.search(r"rss ([0-9]+)", l).group(1)) for l in rows]
    print(f"| `{b}` | {', '.join(f'{x:.2f}' for x in n)} | **{statistics.median(n):.2f} s** | "
          f"{', '.join(f'{x:.2f}' for x in r)} | **{statistics.median(r):.2f} s** | {', '.join(map(str, m))} |")
peer = [float(re.search(r"rematch ([0-9.]+)", l).group(1)) for l in lines if " peer script " in l]
if peer:
    print(f"| peer script (bench/peer.sh) | | | {', '.join(f'{x:.2f}' for x in peer)} | **{statistics.median(peer):.2f} s** |")
EOF
