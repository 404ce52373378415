#!/usr/bin/env bash
# Builds callrecon's Debian package with cargo-deb: the stripped binary in /usr/bin, a man page per
# command and bash/zsh/fish completions (generated from the CLI's definitions by the hidden
# `callrecon generate-docs`), systemd units installed disabled (callrecon-schedule.service, and
# callrecon-run@.service with its nightly callrecon-run@.timer) running as the system user
# callrecon that the package creates, /etc/callrecon/callrecon.env, an example job in
# /usr/share/doc/callrecon/examples, and the guides in /usr/share/doc/callrecon.
#
#   scripts/package.sh                 # a release build: the package to install (a cold release
#                                      # build with polars takes a long while: see README.md)
#   scripts/package.sh --profile dev   # packages the debug build scripts/test.sh already made
#                                      # (CI checks the packaging itself this way, no release build)
#
# Prints the package's path (under $CARGO_TARGET_DIR/debian/). cargo-deb is installed from
# crates.io (`cargo install cargo-deb --version 3.8.0 --locked`) when missing; with
# `--profile dev` it warns that it is meant for releases (that is the point of the release build).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/callrecon-target}"
profile=release
if [ "${1:-}" = --profile ]; then profile="${2:?--profile NAME}"; fi
dir=$profile; [ "$profile" = dev ] && dir=debug

if ! cargo deb --version >/dev/null 2>&1; then
  echo "package.sh: installing cargo-deb from crates.io" >&2
  cargo install cargo-deb --version 3.8.0 --locked >&2
fi
if ! command -v dpkg-deb >/dev/null; then
  echo "package.sh: dpkg-deb is missing (Debian's dpkg package)" >&2
  exit 1
fi
cargo build --quiet --profile "$profile" --bin callrecon
bin="$CARGO_TARGET_DIR/$dir/callrecon"

rm -rf pkg/generated
"$bin" generate-docs pkg/generated
gzip -9n pkg/generated/man/*.1
# Stripped: the package's binary has no line tables (the build keeps them for backtraces).
cargo deb --profile "$profile" --no-build --strip --no-separate-debug-symbols --output "$CARGO_TARGET_DIR/debian/" >&2
ls -t "$CARGO_TARGET_DIR"/debian/callrecon_*.deb | head -n 1
