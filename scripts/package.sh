#!/usr/bin/env bash
# Builds the Debian package with cargo-deb: target/debian/edgemux_<version>-1_<arch>.deb, holding
# the binary, the systemd unit (deploy/systemd/edgemux.service with the package's paths and its
# system user), the default config as a conffile, shell completions and the man page (both
# generated from the binary's own CLI definition).
#
#   bash scripts/package.sh            a release build, then the package
#   bash scripts/package.sh --dev      the package around the current debug build (the tests)
#
# Needs cargo-deb: cargo install cargo-deb --locked
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
if [ "${1:-}" = "--dev" ]; then
  profile=dev
  shift
fi
command -v cargo-deb >/dev/null || { echo "cargo-deb is missing: cargo install cargo-deb --locked" >&2; exit 1; }

target_dir="$(cargo metadata --format-version 1 --no-deps --locked | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
if [ "$profile" = release ]; then
  cargo build --release --locked
  bin="$target_dir/release/edgemux"
else
  bin="$target_dir/debug/edgemux"
  [ -x "$bin" ] || cargo build --locked
fi

assets=target/deb-assets
mkdir -p "$assets"
# The one unit, with the package's binary path and a system user (made by the postinst) instead
# of a dynamic one.
sed -e 's#/usr/local/bin/edgemux#/usr/bin/edgemux#g' \
    -e 's#^DynamicUser=yes#User=edgemux\nGroup=edgemux#' \
    -e 's#^\# A fresh unprivileged user each start; it owns#\# The package'"'"'s system user; it owns#' \
    -e '/^\#   [a-z]*install\|^\#   systemctl/d' \
    -e 's#^\# edgemux as a hardened systemd service. Install.*#\# edgemux as a hardened systemd service, installed by the edgemux Debian package.#' \
    deploy/systemd/edgemux.service > "$assets/edgemux.service"
grep -q '^User=edgemux$' "$assets/edgemux.service"
if grep -n 'DynamicUser\|/usr/local/bin\|fresh unprivileged' "$assets/edgemux.service"; then
  echo "package.sh: the packaged unit still says the above; update the sed edits" >&2
  exit 1
fi
"$bin" completions bash > "$assets/edgemux.bash"
"$bin" completions zsh > "$assets/_edgemux"
"$bin" completions fish > "$assets/edgemux.fish"
"$bin" manpage | gzip -9n > "$assets/edgemux.1.gz"

cargo deb --no-build --locked --profile "$profile" "$@"
