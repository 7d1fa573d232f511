#!/bin/bash
# Docker HEALTHCHECK for edgemux: GET /healthz on the admin listener with nothing but bash (its
# /dev/tcp), because debian:bookworm-slim has no curl. Exit 0 on "200", 1 otherwise.
# Usage: edgemux-healthcheck [HOST:PORT]   (default 127.0.0.1:9090)
set -euo pipefail
addr=${1:-127.0.0.1:9090}
host=${addr%:*}
port=${addr##*:}
exec 3<>"/dev/tcp/${host}/${port}"
printf 'GET /healthz HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$addr" >&3
IFS=' ' read -r -t 4 _version status _reason <&3
[[ $status == 200 ]]
