#!/bin/bash
# edgemux vs. Sandhole, side by side, in one run, on 127.0.0.1.
#
#   bash bench/sandhole.sh            (as root: installs Sandhole with cargo into a cache dir)
#
# Both gateways get the same real tunnel client (`ssh -N -R app:80:127.0.0.1:BACKEND`), the same
# backend nginx (the chain's, from ../shared/bench/chain: /big 1 GiB, /hello 6 bytes) and the same
# P-256 certificate. Sandhole cannot carry SSH inside TLS, so the like-for-like pair is edgemux in
# raw-SSH mode (the client connects to edgemux's one port without TLS) against Sandhole's SSH
# port; edgemux in SSH-inside-TLS mode (the mission's mode) is measured beside them. Workloads
# alternate between the systems, each after waiting for a quiet machine.
#
# Sandhole runs with --disable-http-logs --http-pool-size 128 --max-simultaneous-connections-per-ip
# 1024; edgemux's like-for-like knob is `limits.client_buffer_share` (all load comes from one
# address): raised to the whole tunnel buffer budget here. Knobs: BENCH_DURATION (10), CONNS
# ("1 16 64 256"), H2_CONNS ("64 256"), BULK_REPS (2), SANDHOLE_VERSION (0.10.5), SANDHOLE_BIN,
# EDGEMUX_BIN, QUIET_PCT, QUIET_WAIT.
set -uo pipefail
export LC_ALL=C

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$REPO/bench
CHAIN=${CHAIN_SCRIPTS:-$(dirname "$REPO")/shared/bench/chain}
[ -r "$CHAIN/env.sh" ] || { echo "sandhole: chain scripts not found at $CHAIN (set CHAIN_SCRIPTS)" >&2; exit 1; }
# shellcheck source=/dev/null
. "$CHAIN/env.sh"   # CHAIN_DIR, BACKEND_PORT, BIG_SIZE_MB

DUR=${BENCH_DURATION:-10}
CONNS=${CONNS:-1 16 64 256}
H2_CONNS=${H2_CONNS:-64 256}
BULK_REPS=${BULK_REPS:-2}
QUIET_PCT=${QUIET_PCT:-10}
QUIET_WAIT=${QUIET_WAIT:-60}
SANDHOLE_VERSION=${SANDHOLE_VERSION:-0.10.5}
SANDHOLE_CACHE=${SANDHOLE_CACHE:-$HOME/.cache/edgemux-bench/sandhole-$SANDHOLE_VERSION}
EM_PORT=${EM_PORT:-9543} EM_ADMIN=${EM_ADMIN:-9590} SH_SSH=${SH_SSH:-9522} SH_HTTPS=${SH_HTTPS:-9544} SH_HTTP=${SH_HTTP:-9580}
OUT_ROOT=${BENCH_OUT:-/tmp/edgemux-bench}
W=$OUT_ROOT/sandhole-$(date +%Y%m%d-%H%M%S)
mkdir -p "$W" "$OUT_ROOT/results"
OUT=$OUT_ROOT/results/$(basename "$W").txt
exec > >(tee "$OUT") 2>&1
PROCS=(python3 "$BENCH/procs.py")
# shellcheck source=lib.sh
. "$BENCH/lib.sh"
die() { echo "sandhole: $*" >&2; exit 1; }

# wrk sends SNI from the URL's host, and Sandhole routes by SNI: the tunnel hosts go into
# /etc/hosts for the run (lines marked, removed on exit).
HOSTS_MARK="edgemux-bench-$$"
PIDS=() GROUPS_=()   # gateways (in this script's process group), tunnel clients (setsid)
cleanup() {
  trap - EXIT INT TERM
  local p
  for p in "${GROUPS_[@]}"; do stop_pid "$p" group; done
  for p in "${PIDS[@]}"; do stop_pid "$p"; done
  sed -i "/$HOSTS_MARK/d" /etc/hosts
  echo "sandhole: output saved to $OUT (logs under $W)"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------ parts
build_edgemux
SANDHOLE=${SANDHOLE_BIN:-$SANDHOLE_CACHE/bin/sandhole}
if [ ! -x "$SANDHOLE" ]; then
  hdr "install: cargo install sandhole $SANDHOLE_VERSION into $SANDHOLE_CACHE (once; reused)"
  # not --locked: the published lock file names a webpki-roots release the registry no longer serves
  cargo install sandhole --version "$SANDHOLE_VERSION" --root "$SANDHOLE_CACHE" 2>&1 | tail -2
  [ -x "$SANDHOLE" ] || die "sandhole did not install"
fi
for p in $EM_PORT $EM_ADMIN $SH_SSH $SH_HTTPS $SH_HTTP; do listening "$p" && die "port $p is in use"; done
bash "$CHAIN/setup.sh" >/dev/null 2>&1 || die "chain setup (backend nginx files) failed"
if ! listening "$BACKEND_PORT"; then
  nginx -c "$CHAIN_DIR/nginx-backend.conf" || die "backend nginx did not start"
  STARTED_NGINX=1
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$W/tls.key" -out "$W/tls.crt" \
  -days 30 -subj /CN=gw.test -addext "subjectAltName=DNS:gw.test,DNS:*.gw.test" 2>/dev/null
ssh-keygen -q -t ed25519 -N '' -C edgemux-bench -f "$W/client"
mkdir -p "$W/em" "$W/sh/user_keys" "$W/sh/admin_keys" "$W/sh/certificates/gw.test" "$W/sh/server_keys"
cp "$W/client.pub" "$W/sh/user_keys/bench.pub"
cp "$W/tls.crt" "$W/sh/certificates/gw.test/fullchain.pem"; cp "$W/tls.key" "$W/sh/certificates/gw.test/privkey.pem"
cat > "$W/edgemux.toml" <<TOML
domain = "gw.test"
public_port = $EM_PORT
[[listener]]
bind = "127.0.0.1:$EM_PORT"
[tls]
certs_dir = "$W/em"
[[tls.certificate]]
cert = "$W/tls.crt"
key = "$W/tls.key"
[limits]
max_connections = 30000
max_connections_per_client = 30000
client_buffer_share = 268435456
header_timeout = "65s"
drain_timeout = "2s"
[admin]
bind = "127.0.0.1:$EM_ADMIN"
TOML
"$BIN" check -c "$W/edgemux.toml" || die "edgemux rejected the config"
KEYID=$("$BIN" keyid "$W/client.pub")
SSH=(-n -N -F /dev/null -i "$W/client" -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no
  -o UserKnownHostsFile=/dev/null -o ExitOnForwardFailure=yes -o ServerAliveInterval=30)

hdr "start: edgemux 127.0.0.1:$EM_PORT, Sandhole ssh :$SH_SSH https :$SH_HTTPS"
RUST_LOG=warn "$BIN" serve -c "$W/edgemux.toml" >"$W/edgemux.out" 2>"$W/edgemux.log" &
EM=$!; PIDS+=("$EM")
(cd "$W/sh" && exec "$SANDHOLE" --domain gw.test --listen-address 127.0.0.1 --ssh-port "$SH_SSH" \
  --http-port "$SH_HTTP" --https-port "$SH_HTTPS" --disable-http-logs --http-pool-size 128 \
  --max-simultaneous-connections-per-ip 1024 --allow-requested-subdomains \
  --user-keys-directory ./user_keys --admin-keys-directory ./admin_keys \
  --certificates-directory ./certificates --private-key-file ./server_keys/ssh \
  --acme-cache-directory ./acme >"$W/sandhole.log" 2>&1) &
SH=$!; PIDS+=("$SH")
sleep 2
tunnel() { # name args... : an ssh -R client in its own process group
  setsid ssh "${SSH[@]}" "${@:2}" </dev/null >"$W/ssh-$1.log" 2>&1 &
  GROUPS_+=("$!")
}
tunnel raw -p "$EM_PORT" -R "app:80:127.0.0.1:$BACKEND_PORT" -l bench 127.0.0.1
tunnel tls -o "ProxyCommand=openssl s_client -quiet -connect 127.0.0.1:$EM_PORT -servername gw.test" \
  -R "tls:80:127.0.0.1:$BACKEND_PORT" -l bench gw.test
tunnel sandhole -p "$SH_SSH" -R "app:80:127.0.0.1:$BACKEND_PORT" 127.0.0.1
declare -A HOST=([em-raw]=app-$KEYID.gw.test [em-tls]=tls-$KEYID.gw.test [sandhole]=app.gw.test)
declare -A PORT=([em-raw]=$EM_PORT [em-tls]=$EM_PORT [sandhole]=$SH_HTTPS)
declare -A PID=([em-raw]=$EM [em-tls]=$EM [sandhole]=$SH)
SYSTEMS="sandhole em-raw em-tls"
for s in $SYSTEMS; do echo "127.0.0.1 ${HOST[$s]} # $HOSTS_MARK" >> /etc/hosts; done
for s in $SYSTEMS; do
  for ((i = 0; i < 100; i++)); do
    [ "$(curl -sk --max-time 2 --resolve "${HOST[$s]}:${PORT[$s]}:127.0.0.1" "https://${HOST[$s]}:${PORT[$s]}/hello")" = hello ] && break
    sleep 0.2
  done
  [ "$i" -lt 100 ] || die "$s: the tunnel did not come up (logs in $W)"
done
# The real gateway pids (Sandhole runs under a subshell).
PID[sandhole]=$(pgrep -P "$SH" -x sandhole || echo "$SH")
echo "up: $(for s in $SYSTEMS; do printf '%s https://%s:%s ' "$s" "${HOST[$s]}" "${PORT[$s]}"; done)"
echo "edgemux $("$BIN" --version) @ $(cd "$REPO" && git rev-parse --short HEAD); sandhole $SANDHOLE_VERSION; $(uname -r); $(nproc) CPUs"

declare -A V
ROWS=()
row() { ROWS+=("$1|$2|${V[sandhole.$3]:-?}|${V[em-raw.$3]:-?}|${V[em-tls.$3]:-?}"); }
rss() { awk '/VmRSS/{printf "%.1f", $2/1024}' "/proc/$1/status"; }
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # ticks
ticks_s() { awk -v t="$1" -v hz="$(getconf CLK_TCK)" 'BEGIN{printf "%.2f", t/hz}'; }

# ------------------------------------------------------------------ memory idle
for s in sandhole em-raw; do V[$s.idle]=$(rss "${PID[$s]}"); done
V[em-tls.idle]=${V[em-raw.idle]}
row "RSS idle, MiB" lower idle

# ------------------------------------------------------------------ bulk
hdr "bulk download: GET /big ($BIG_SIZE_MB MiB), best of $BULK_REPS"
for s in $SYSTEMS; do V[$s.bulk]=0; done
for ((r = 1; r <= BULK_REPS; r++)); do
  for s in $SYSTEMS; do
    wait_quiet
    c0=$(cpu "${PID[$s]}")
    res=$(curl -sk --max-time 300 --resolve "${HOST[$s]}:${PORT[$s]}:127.0.0.1" -o /dev/null \
      -w '%{http_code} %{size_download} %{speed_download}' "https://${HOST[$s]}:${PORT[$s]}/big")
    c1=$(cpu "${PID[$s]}")
    read -r code size bps <<<"$res"
    mbs=$(awk -v b="$bps" 'BEGIN{printf "%.0f", b/1e6}')
    cpg=$(awk -v c="$(ticks_s $((c1 - c0)))" -v b="$size" 'BEGIN{printf "%.2f", c / (b / 1073741824)}')
    echo "  $s rep $r: HTTP $code, $mbs MB/s, gateway CPU $cpg s/GiB"
    if [ "$code" = 200 ] && [ "$mbs" -gt "${V[$s.bulk]}" ]; then V[$s.bulk]=$mbs; V[$s.bulkcpu]=$cpg; fi
  done
done
row "bulk download 1 GiB, MB/s" higher bulk
row "gateway CPU s per GiB downloaded" lower bulkcpu

# ------------------------------------------------------------------ wrk
MAXC=$(echo "$CONNS" | tr ' ' '\n' | sort -n | tail -1)
hdr "HTTP/1.1: wrk GET /hello, ${DUR}s per run, keep-alive"
for c in $CONNS; do
  th=$(( c < 2 ? c : 2 ))
  for s in $SYSTEMS; do
    wait_quiet
    c0=$(cpu "${PID[$s]}")
    memjob=""
    if [ "$c" = "$MAXC" ]; then
      { sleep $((DUR / 2)); rss "${PID[$s]}" > "$W/load-$s"; } &
      memjob=$!
    fi
    wrk -t"$th" -c"$c" -d"${DUR}s" --latency "https://${HOST[$s]}:${PORT[$s]}/hello" > "$W/wrk.txt" 2>&1
    [ -n "$memjob" ] && wait "$memjob"
    c1=$(cpu "${PID[$s]}")
    rps=$(awk '/^Requests\/sec:/{printf "%.0f", $2}' "$W/wrk.txt")
    n=$(awk '/requests in/{print $1; exit}' "$W/wrk.txt")
    bad=$(awk '/Non-2xx/{print $NF}' "$W/wrk.txt")
    V[$s.wrk$c]=${rps:-?}${bad:+ ($bad bad)}
    V[$s.wrk$c.p50]=$(to_ms "$(awk '$1=="50%"{print $2}' "$W/wrk.txt")")
    V[$s.wrk$c.p99]=$(to_ms "$(awk '$1=="99%"{print $2}' "$W/wrk.txt")")
    V[$s.wrk$c.cpu]=$(awk -v t="$(ticks_s $((c1 - c0)))" -v n="${n:-0}" 'BEGIN{ if (n > 0) printf "%.0f", 1e6 * t / n; else print "?" }')
    echo "  $s c=$c: ${V[$s.wrk$c]} req/s, p50 ${V[$s.wrk$c.p50]} ms, p99 ${V[$s.wrk$c.p99]} ms, ${V[$s.wrk$c.cpu]} us CPU/req"
  done
  row "wrk c=$c, req/s" higher "wrk$c"; row "wrk c=$c, p50 ms" lower "wrk$c.p50"
  row "wrk c=$c, p99 ms" lower "wrk$c.p99"; row "wrk c=$c, gateway CPU us/req" lower "wrk$c.cpu"
done
for s in $SYSTEMS; do V[$s.loadrss]=$(cat "$W/load-$s" 2>/dev/null); done
row "RSS under wrk c=$MAXC, MiB" lower loadrss

# ------------------------------------------------------------------ h2load
hdr "h2load GET /hello, ${DUR}s per run, 1 stream per connection"
for c in $H2_CONNS; do
  for s in $SYSTEMS; do
    wait_quiet
    rm -f "$W/h2load.log"
    h2load -c"$c" -t2 -m1 -D"$DUR" --connect-to="127.0.0.1:${PORT[$s]}" --log-file="$W/h2load.log" \
      "https://${HOST[$s]}:${PORT[$s]}/hello" > "$W/h2load.txt" 2>&1
    rps=$(awk '/^finished in/{for(i=1;i<=NF;i++) if($(i+1) ~ /^req\/s/) printf "%.0f", $i}' "$W/h2load.txt")
    proto=$(grep -m1 -o 'Application protocol: [^ ]*' "$W/h2load.txt" | awk '{print $3}')
    read -r p50 p99 < <("${PROCS[@]}" pct "$W/h2load.log" 3 0.001 50 99)
    V[$s.h2$c]="${rps:-?}${proto:+ $proto}"; V[$s.h2$c.p99]=$p99
    echo "  $s c=$c: ${V[$s.h2$c]} req/s, p50 $p50 ms, p99 $p99 ms"
  done
  row "h2load c=$c, req/s" higher "h2$c"; row "h2load c=$c, p99 ms" lower "h2$c.p99"
done

# ------------------------------------------------------------------ memory after the load
hdr "memory 30 s after the load"
sleep 30
for s in sandhole em-raw; do V[$s.after]=$(rss "${PID[$s]}"); done
V[em-tls.after]=${V[em-raw.after]}
row "RSS 30 s after the load, MiB" lower after

# ------------------------------------------------------------------ table
hdr "results (edgemux raw = like for like with Sandhole; edgemux tls = SSH inside TLS)"
printf '%-38s | %10s | %12s | %12s | %8s | %s\n' workload sandhole "edgemux raw" "edgemux tls" raw/sh better
for r in "${ROWS[@]}"; do
  IFS='|' read -r label better sh raw tls <<<"$r"
  ratio=$(awk -v a="${raw%% *}" -v b="${sh%% *}" 'BEGIN{ if (b+0 > 0 && a+0 == a) printf "%.2fx", a/b; else print "-" }')
  printf '%-38s | %10s | %12s | %12s | %8s | %s\n' "$label" "$sh" "$raw" "$tls" "$ratio" "$better"
done
echo "(em-tls shares the edgemux process with em-raw: its idle and after-load RSS are the same process's)"
if [ "${STARTED_NGINX:-0}" = 1 ]; then nginx -c "$CHAIN_DIR/nginx-backend.conf" -s stop; fi
