#!/usr/bin/env bash
# Installs callrecon's Debian package and checks it as an operator would, then removes it:
# dpkg -i; `callrecon --version` names the version and the commit; `man callrecon-run` shows the
# run command's page; the completions load in bash; `systemd-analyze verify` accepts the units;
# the system user and its folder exist. CI runs it after scripts/test.sh (.ci/run) on the debug
# build the tests made: it checks the packaging, not a release build's speed.
#
#   scripts/package-check.sh [DEB]   # default: the package of `scripts/package.sh --profile dev`
#
# It installs into the machine it runs on (as root, or with sudo): run it where that is fine.
set -euo pipefail
cd "$(dirname "$0")/.."
sudo=""; [ "$(id -u)" -ne 0 ] && sudo=sudo
missing=()
command -v man >/dev/null || missing+=(man-db)
command -v systemd-analyze >/dev/null || missing+=(systemd)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "package-check.sh: installing ${missing[*]}" >&2
  $sudo apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
fi
deb="${1:-$(bash scripts/package.sh --profile dev | tail -n 1)}"
echo "package-check.sh: checking $deb" >&2

# Images that leave man pages out (path-exclude in /etc/dpkg/dpkg.cfg.d) still get ours.
$sudo dpkg -i --path-include='/usr/share/man/man1/callrecon*' "$deb" >&2
trap '$sudo dpkg --purge callrecon >/dev/null' EXIT

fail() { echo "package-check.sh: $*" >&2; exit 1; }
version=$(/usr/bin/callrecon --version)
[[ "$version" =~ ^callrecon\ [0-9]+\.[0-9]+\.[0-9]+\ \(commit\ [0-9a-f]{12}\)$ ]] || fail "--version printed: $version"
MANPAGER=cat MANWIDTH=100 man callrecon-run 2>/dev/null | grep -q -- "--dry-run" || fail "man callrecon-run shows no --dry-run"
for page in callrecon callrecon-schedule callrecon-resolve callrecon-users-add; do
  man -w "$page" >/dev/null 2>&1 || fail "no man page $page"
done
bash -c '. /usr/share/bash-completion/completions/callrecon && complete -p callrecon' >/dev/null \
  || fail "the bash completion does not load"
units=/usr/lib/systemd/system
# A template is verified through an instance of it.
tmp=$(mktemp -d); trap '$sudo dpkg --purge callrecon >/dev/null; rm -rf "$tmp"' EXIT
cp "$units/callrecon-run@.service" "$tmp/callrecon-run@nightly.service"
cp "$units/callrecon-run@.timer" "$tmp/callrecon-run@nightly.timer"
systemd-analyze verify "$units/callrecon-schedule.service" "$tmp/callrecon-run@nightly.service" \
  "$tmp/callrecon-run@nightly.timer" || fail "systemd-analyze verify refused a unit"
getent passwd callrecon >/dev/null || fail "no system user callrecon"
[ "$(stat -c %U /var/lib/callrecon)" = callrecon ] || fail "/var/lib/callrecon is not callrecon's"
[ -f /usr/share/doc/callrecon/examples/nightly.toml ] || fail "no example job"
[ "$(stat -c %a:%G /etc/callrecon/callrecon.env)" = 640:callrecon ] || fail "callrecon.env's mode: $(stat -c %a:%G /etc/callrecon/callrecon.env)"
echo "package-check.sh: $deb installs; $version; man pages, completions, units, user: ok"
