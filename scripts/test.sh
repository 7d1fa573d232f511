#!/usr/bin/env bash
# The one test command: installs what the tests need on a fresh Debian 12 machine, then runs
# formatting and lint checks and every test (unit, corpus replays, integration with real peers).
set -euo pipefail
cd "$(dirname "$0")/.."

# Real peers the integration tests drive (see tests/common).
PACKAGES=(openssh-client openssl curl haproxy pebble prometheus systemd patch testssl.sh)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

cargo fmt --all -- --check
bash scripts/check-vendor.sh
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
