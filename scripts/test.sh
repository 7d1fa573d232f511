#!/usr/bin/env bash
# The one test command: installs what the tests need on a fresh Debian 12 machine, then runs
# formatting and lint checks and every test (unit, corpus replays, integration with real peers).
set -euo pipefail
cd "$(dirname "$0")/.."

# Real peers the integration tests drive (see tests/common; chromium renders the gateway's pages
# in tests/pages.rs), the etcd and Redis servers the
# cluster tests start (tests/cluster_store/, tests/cluster/), and protoc, which the etcd client's
# build runs. Debian's postinst may start a system redis-server on 6379; the tests start their own
# on free ports, so it is stopped and disabled here (it would only take memory).
PACKAGES=(openssh-client openssl curl haproxy pebble prometheus systemd patch python3-venv testssl.sh chromium
  etcd-server redis-server protobuf-compiler)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
  if [[ " ${missing[*]} " == *" redis-server "* ]]; then
    $SUDO systemctl disable --now redis-server >/dev/null 2>&1 || $SUDO service redis-server stop >/dev/null 2>&1 || true
  fi
fi

# ssh-audit and grpcio, pinned, in a virtualenv beside the build (tests/ssh_algorithms.rs and
# tests/grpc.rs run them).
SSH_AUDIT_VERSION=3.3.0
GRPCIO_VERSION=1.76.0
VENV="${CARGO_TARGET_DIR:-target}/venv"
[ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check "ssh-audit==$SSH_AUDIT_VERSION" "grpcio==$GRPCIO_VERSION"
EDGEMUX_SSH_AUDIT="$(cd "$VENV" && pwd)/bin/ssh-audit"
# A gRPC server and client for tests/grpc.rs.
EDGEMUX_PYTHON="$(cd "$VENV" && pwd)/bin/python"
export EDGEMUX_SSH_AUDIT EDGEMUX_PYTHON

# cargo-deb, pinned, for the package test (tests/package.rs runs scripts/package.sh).
CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version 2>/dev/null | grep -qF "$CARGO_DEB_VERSION"; then
  cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION"
fi

cargo fmt --all -- --check
bash scripts/check-vendor.sh
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked --no-fail-fast
# The cluster scenarios again on the other store backend (the run above used etcd, the default).
EDGEMUX_TEST_STORE=redis cargo test --locked --test cluster
