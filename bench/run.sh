#!/bin/bash
# edgemux vs. the stunnel + sslh + sshd + nginx chain and vs. Sandhole, side by side, in one run,
# on 127.0.0.1.
#
#   bash bench/run.sh                       (as root: the chain's setup.sh installs packages)
#
# Builds edgemux (release), sets up and starts the chain with ../shared/bench/chain, starts edgemux
# with two real `ssh -R` tunnel clients to the same backend nginx (one inside TLS, the mission's
# mode; one raw SSH, like for like with Sandhole) and Sandhole (installed from crates.io into a
# cache directory) with its own, then runs every workload against each, alternating the order per
# workload, each after waiting for a quiet machine, and prints one table.
# Everything is bounded in count and time; every process started here is stopped on exit.
# Knobs (environment) are documented in bench/README.md.
set -uo pipefail
export LC_ALL=C

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$REPO/bench
CHAIN=${CHAIN_SCRIPTS:-$(dirname "$REPO")/shared/bench/chain}
if [ ! -r "$CHAIN/env.sh" ]; then
  echo "run: chain scripts not found at $CHAIN (set CHAIN_SCRIPTS)" >&2; exit 1
fi
# shellcheck source=/dev/null
. "$CHAIN/env.sh"   # CHAIN_DIR, RUN_DIR, LOG_DIR, TLS_PORT, BACKEND_PORT, TEST_USER, ...

DUR=${BENCH_DURATION:-10}
CONNS=${CONNS:-1 16 64 256}
H2_CONNS=${H2_CONNS:-$CONNS}
MEM_AT=${MEM_AT:-64 256}
AFTER_WAIT=${AFTER_WAIT:-30}
SANDHOLE=${SANDHOLE:-1}
SANDHOLE_VERSION=${SANDHOLE_VERSION:-0.10.5}
SANDHOLE_CACHE=${SANDHOLE_CACHE:-$HOME/.cache/edgemux-bench/sandhole-$SANDHOLE_VERSION}
SH_SSH=${SH_SSH:-9522} SH_HTTPS=${SH_HTTPS:-9544} SH_HTTP=${SH_HTTP:-9580}
TUNNELS=${TUNNELS:-1000}
IDLE_TLS=${IDLE_TLS:-10000}
STEPS=${STEPS:-bulk upload wrk h2 handshake ttfb tunnels idletls}
BULK_REPS=${BULK_REPS:-2}
UPLOAD_MB=${UPLOAD_MB:-256}
TTFB_N=${TTFB_N:-50}
QUIET_PCT=${QUIET_PCT:-10}
QUIET_WAIT=${QUIET_WAIT:-60}
RETRIES=${RETRIES:-1}
EDGEMUX_PORT=${EDGEMUX_PORT:-9443}
ADMIN_PORT=${ADMIN_PORT:-9490}
SINK_PORT=${SINK_PORT:-9480}
OUT_ROOT=${BENCH_OUT:-/tmp/edgemux-bench}
step() { [[ " $STEPS " == *" $1 "* ]]; }

STAMP=$(date +%Y%m%d-%H%M%S)
W=$OUT_ROOT/$STAMP
mkdir -p "$W" "$OUT_ROOT/results"
OUT=$OUT_ROOT/results/$STAMP.txt
exec > >(tee "$OUT") 2>&1
PROCS=(python3 "$BENCH/procs.py")
# shellcheck source=lib.sh
. "$BENCH/lib.sh"   # hdr, listening, stop_pid, busy_pct, wait_quiet, to_ms

# ------------------------------------------------------------------ cleanup
EM_PID="" TUN_PID="" RAWTUN_PID="" SH_PID="" SHTUN_PID="" SINK_PID="" HELPER_PID="" CHAIN_STARTED=0
SINKTUNS=()
# wrk and h2load send SNI from the URL's host and Sandhole routes by SNI: the tunnel hosts go into
# /etc/hosts for the run (lines marked, removed on exit).
HOSTS_MARK="edgemux-bench-$$"
cleanup() {
  trap - EXIT INT TERM
  echo
  echo "run: cleaning up"
  stop_pid "$HELPER_PID"
  for p in "${SINKTUNS[@]}"; do stop_pid "$p" group; done
  stop_pid "$TUN_PID" group
  stop_pid "$RAWTUN_PID" group
  stop_pid "$SHTUN_PID" group
  stop_pid "$SINK_PID"
  stop_pid "$EM_PID"
  stop_pid "$SH_PID"
  [ "$CHAIN_STARTED" = 1 ] && bash "$CHAIN/stop.sh"
  sed -i "/$HOSTS_MARK/d" /etc/hosts
  rm -f "$W/up.bin"
  echo "run: output saved to $OUT (logs under $W)"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

die() { echo "run: $*" >&2; exit 1; }

# ------------------------------------------------------------------ build, chain, edgemux
build_edgemux

SYSTEMS="chain edgemux em-raw"
if [ "$SANDHOLE" = 1 ]; then
  SYSTEMS="$SYSTEMS sandhole"
  SANDHOLE_BIN=${SANDHOLE_BIN:-$SANDHOLE_CACHE/bin/sandhole}
  if [ ! -x "$SANDHOLE_BIN" ]; then
    hdr "install: cargo install sandhole $SANDHOLE_VERSION into $SANDHOLE_CACHE (once; reused)"
    # not --locked: the published lock file names a webpki-roots release the registry no longer serves
    cargo install sandhole --version "$SANDHOLE_VERSION" --root "$SANDHOLE_CACHE" 2>&1 | tail -2
    [ -x "$SANDHOLE_BIN" ] || die "sandhole did not install (SANDHOLE=0 runs without it)"
  fi
fi

for p in $EDGEMUX_PORT $ADMIN_PORT $SINK_PORT $SH_SSH $SH_HTTPS $SH_HTTP; do
  listening "$p" && die "port 127.0.0.1:$p is in use (set EDGEMUX_PORT / ADMIN_PORT / SINK_PORT / SH_*)"
done

hdr "chain: setup.sh and start.sh ($CHAIN)"
bash "$CHAIN/setup.sh" | tail -2 || die "chain setup failed"
# the chain's daemons and the load generators inherit this: 10k connections need the fds
ulimit -n "$(ulimit -Hn)" 2>/dev/null
pidof_file() { head -n1 "$RUN_DIR/$1.pid" 2>/dev/null | tr -dc 0-9; }
declare -A PORT=([chain]=$TLS_PORT [edgemux]=$EDGEMUX_PORT [em-raw]=$EDGEMUX_PORT [sandhole]=$SH_HTTPS) HOST GW
start_chain() {
  CHAIN_STARTED=1
  bash "$CHAIN/start.sh" >"$W/chain-start.log" 2>&1 || { cat "$W/chain-start.log";
    die "chain did not start (if it is already running: bash $CHAIN/stop.sh)"; }
  [ -s "$RUN_DIR/tunnel.port" ] && TUNNEL_PORT=$(cat "$RUN_DIR/tunnel.port")
  HOST[chain]=app.gw.test
  GW[chain]="$(pidof_file stunnel),$(pidof_file sslh),$(pidof_file sshd),$(pidof_file nginx-proxy)"
}
stop_chain() { bash "$CHAIN/stop.sh" >>"$W/chain-stop.log" 2>&1; CHAIN_STARTED=0; }
start_chain
tail -2 "$W/chain-start.log"

hdr "edgemux: 127.0.0.1:$EDGEMUX_PORT (admin 127.0.0.1:$ADMIN_PORT)"
CERT=$CHAIN_DIR/tls/$CERT_TYPE.crt
KEY=$CHAIN_DIR/tls/$CERT_TYPE.key
if ! openssl x509 -in "$CERT" -noout -ext subjectAltName 2>/dev/null | grep -q 'DNS:\*\.gw\.test'; then
  CERT=$W/tls.crt KEY=$W/tls.key
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$KEY" -out "$CERT" \
    -days 30 -subj /CN=gw.test -addext "subjectAltName=DNS:gw.test,DNS:*.gw.test" 2>/dev/null
fi
echo "certificate: $CERT (the chain's stunnel serves $CHAIN_DIR/tls/$CERT_TYPE.crt)"
mkdir -p "$W/edgemux"
# Limits raised only where the benchmark itself would hit them: all clients come from 127.0.0.1
# (per-client cap 256, and one client's share of the tunnel buffer budget: raised to the whole
# budget, as Sandhole runs with --max-simultaneous-connections-per-ip 1024), one key holds every
# tunnel (64 per key), 10k idle connections (10k cap).
# header_timeout = nginx's keepalive_timeout (65 s), so idle keep-alive connections live as long
# on both sides; drain_timeout short so that the run stops quickly.
cat > "$W/edgemux.toml" <<TOML
domain = "gw.test"
public_port = $EDGEMUX_PORT

[[listener]]
bind = "127.0.0.1:$EDGEMUX_PORT"

[tls]
certs_dir = "$W/edgemux"
[[tls.certificate]]
cert = "$CERT"
key = "$KEY"

[limits]
max_connections = 30000
max_connections_per_client = 30000
tunnels_per_key = 20000
client_buffer_share = 268435456
header_timeout = "65s"
drain_timeout = "2s"

[admin]
bind = "127.0.0.1:$ADMIN_PORT"
TOML
"$BIN" check -c "$W/edgemux.toml" || die "edgemux rejected the benchmark config"
ssh-keygen -q -t ed25519 -N '' -C edgemux-bench -f "$W/client_ed25519"
KEYID=$("$BIN" keyid "$W/client_ed25519.pub") || die "edgemux keyid failed"
HOST[edgemux]=app-$KEYID.gw.test HOST[em-raw]=raw-$KEYID.gw.test HOST[sandhole]=app.gw.test
for h in app.gw.test "app-$KEYID.gw.test" "raw-$KEYID.gw.test" "up-$KEYID.gw.test" "upraw-$KEYID.gw.test" up.gw.test; do
  echo "127.0.0.1 $h # $HOSTS_MARK" >> /etc/hosts
done
# RAW_SSH: raw SSH to edgemux's one port (no TLS) and to Sandhole's SSH port, the like-for-like
# pair; EM_SSH: SSH inside TLS, the mission's mode.
RAW_SSH=(-n -N -F /dev/null -i "$W/client_ed25519" -o IdentitiesOnly=yes -o BatchMode=yes
  -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ExitOnForwardFailure=yes
  -o ServerAliveInterval=30)
[ -n "$SSH_CIPHER" ] && RAW_SSH+=(-c "$SSH_CIPHER")
EM_SSH=("${RAW_SSH[@]}" -o "ProxyCommand=openssl s_client -quiet -connect 127.0.0.1:$EDGEMUX_PORT -servername gw.test")
wait_hello() { # host port pid : the tunnel answers /hello (bounded), while its client lives
  local i
  for ((i = 0; i < 150; i++)); do
    [ -d "/proc/$3" ] || return 1
    [ "$(curl -sk --max-time 2 "https://$1:$2/hello")" = hello ] && return 0
    sleep 0.2
  done
  return 1
}
start_edgemux() {
  local i ok=0
  # warn: no per-request log lines (the chain runs nginx with access_log off, stunnel at warning)
  RUST_LOG=${EDGEMUX_LOG:-warn} "$BIN" serve -c "$W/edgemux.toml" >"$W/edgemux.out" 2>>"$W/edgemux.log" &
  EM_PID=$!
  for ((i = 0; i < 100; i++)); do grep -q '^ready' "$W/edgemux.out" 2>/dev/null && break; sleep 0.1; done
  grep -q '^ready' "$W/edgemux.out" || { tail -20 "$W/edgemux.log"; die "edgemux did not start"; }
  # the tunnel client, as a user runs it (plus -v for the log)
  setsid ssh "${EM_SSH[@]}" -v -E "$W/tunnel-ssh.log" -R "app:80:127.0.0.1:$BACKEND_PORT" -l bench gw.test \
    </dev/null >/dev/null 2>&1 &
  TUN_PID=$!
  wait_hello "${HOST[edgemux]}" "$EDGEMUX_PORT" "$TUN_PID" && ok=1
  [ $ok = 1 ] || { tail -5 "$W/tunnel-ssh.log"; tail -5 "$W/edgemux.log"; die "edgemux tunnel did not come up"; }
  setsid ssh "${RAW_SSH[@]}" -v -E "$W/tunnel-raw-ssh.log" -p "$EDGEMUX_PORT" -R "raw:80:127.0.0.1:$BACKEND_PORT" \
    -l bench 127.0.0.1 </dev/null >/dev/null 2>&1 &
  RAWTUN_PID=$!
  wait_hello "${HOST[em-raw]}" "$EDGEMUX_PORT" "$RAWTUN_PID" || { tail -5 "$W/tunnel-raw-ssh.log"; die "edgemux raw tunnel did not come up"; }
  GW[edgemux]=$EM_PID GW[em-raw]=$EM_PID
}
stop_edgemux() {
  stop_pid "$TUN_PID" group; stop_pid "$RAWTUN_PID" group; TUN_PID="" RAWTUN_PID=""
  stop_pid "$EM_PID"; EM_PID=""
}
start_edgemux
echo "edgemux up: https://${HOST[edgemux]}:$EDGEMUX_PORT/hello (SSH inside TLS) and https://${HOST[em-raw]}:$EDGEMUX_PORT/hello (raw SSH) -> hello (pid $EM_PID)"

# Sandhole in raw-SSH mode, same certificate, its throughput knobs opened as its docs advise.
SH_DIR=$W/sandhole
SH_ARGS=(--domain gw.test --listen-address 127.0.0.1 --ssh-port "$SH_SSH" --http-port "$SH_HTTP"
  --https-port "$SH_HTTPS" --disable-http-logs --http-pool-size 128 --max-simultaneous-connections-per-ip 1024
  --allow-requested-subdomains --user-keys-directory ./user_keys --admin-keys-directory ./admin_keys
  --certificates-directory ./certificates --private-key-file ./server_keys/ssh --acme-cache-directory ./acme)
start_sandhole() {
  [ "$SANDHOLE" = 1 ] || return 0
  mkdir -p "$SH_DIR/user_keys" "$SH_DIR/admin_keys" "$SH_DIR/certificates/gw.test" "$SH_DIR/server_keys"
  cp "$W/client_ed25519.pub" "$SH_DIR/user_keys/bench.pub"
  cp "$CERT" "$SH_DIR/certificates/gw.test/fullchain.pem"; cp "$KEY" "$SH_DIR/certificates/gw.test/privkey.pem"
  (cd "$SH_DIR" && exec "$SANDHOLE_BIN" "${SH_ARGS[@]}" >>"$W/sandhole.log" 2>&1) &
  SH_PID=$!
  local i
  for ((i = 0; i < 100; i++)); do listening "$SH_SSH" && break; sleep 0.1; done
  setsid ssh "${RAW_SSH[@]}" -v -E "$W/tunnel-sandhole-ssh.log" -p "$SH_SSH" -R "app:80:127.0.0.1:$BACKEND_PORT" \
    127.0.0.1 </dev/null >/dev/null 2>&1 &
  SHTUN_PID=$!
  wait_hello "${HOST[sandhole]}" "$SH_HTTPS" "$SHTUN_PID" || { tail -5 "$W/sandhole.log"; die "Sandhole tunnel did not come up"; }
  GW[sandhole]=$SH_PID
}
stop_sandhole() { stop_pid "$SHTUN_PID" group; stop_pid "$SH_PID"; SHTUN_PID="" SH_PID=""; }
if [ "$SANDHOLE" = 1 ]; then
  hdr "Sandhole $SANDHOLE_VERSION: ssh 127.0.0.1:$SH_SSH, https 127.0.0.1:$SH_HTTPS"
  start_sandhole
  echo "Sandhole up: https://${HOST[sandhole]}:$SH_HTTPS/hello -> hello (pid $SH_PID)"
fi
ours() { echo "$$,$(cat "$RUN_DIR"/*.pid 2>/dev/null | tr -dc '0-9\n' | paste -sd,)"; }
# Memory figures of a step should not carry what earlier steps left in the allocators (edgemux
# keeps freed heap, so do stunnel and nginx): FRESH=1 restarts both systems before the memory
# steps and takes the idle baseline there.
FRESH=${FRESH:-1}
declare -A BASE_RSS BASE_PSS
baseline() {
  local s
  for s in $SYSTEMS; do read -r "BASE_RSS[$s]" "BASE_PSS[$s]" _ _ < <(mem_of "${GW[$s]}"); done
}
fresh() {
  if [ "$FRESH" = 1 ]; then
    stop_edgemux; stop_sandhole; stop_chain; start_chain; start_edgemux; start_sandhole
    sleep 1
  fi
  baseline
  echo "  (baseline$([ "$FRESH" = 1 ] && echo ' after restarting both'): RSS chain $(mib "${BASE_RSS[chain]}") MiB, edgemux $(mib "${BASE_RSS[edgemux]}") MiB)"
}

# ------------------------------------------------------------------ environment
hdr "environment ($(date -u '+%Y-%m-%d %H:%M:%S UTC'))"
echo "kernel: $(uname -r)   cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc)   mem: $(free -g | awk '/Mem:/{print $2}') GiB"
echo "edgemux: $("$BIN" --version) @ $(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null)$(cd "$REPO" && git diff --quiet HEAD 2>/dev/null || echo ' (+uncommitted changes)')"
echo "chain: $(dpkg-query -W -f='${Package}=${Version} ' stunnel4 sslh openssh-server nginx 2>/dev/null)"
echo "tools: $(dpkg-query -W -f='${Package}=${Version} ' wrk nghttp2-client curl openssl openssh-client 2>/dev/null)"
echo "chain: sslh-$SSLH_VARIANT, $CERT_TYPE cert, upstream keep-alive $UPSTREAM_KEEPALIVE, tunnel port $TUNNEL_PORT;" \
  "ssh cipher $(grep -m1 -o 'kex: server->client cipher: [^ ]*' "$LOG_DIR/tunnel-ssh.log" | awk '{print $4}')"
echo "edgemux: ssh cipher $(grep -m1 -o 'kex: server->client cipher: [^ ]*' "$W/tunnel-ssh.log" | awk '{print $4}'), RUST_LOG=${EDGEMUX_LOG:-warn}"
[ "$SANDHOLE" = 1 ] && echo "sandhole: $("$SANDHOLE_BIN" --version 2>/dev/null | head -1), ssh cipher $(grep -m1 -o 'kex: server->client cipher: [^ ]*' "$W/tunnel-sandhole-ssh.log" | awk '{print $4}'), flags ${SH_ARGS[*]}"
echo "knobs: BENCH_DURATION=$DUR CONNS='$CONNS' H2_CONNS='$H2_CONNS' MEM_AT='$MEM_AT' SANDHOLE=$SANDHOLE TUNNELS=$TUNNELS IDLE_TLS=$IDLE_TLS BULK_REPS=$BULK_REPS UPLOAD_MB=$UPLOAD_MB TTFB_N=$TTFB_N STEPS='$STEPS' QUIET_PCT=$QUIET_PCT QUIET_WAIT=$QUIET_WAIT RETRIES=$RETRIES"
echo "gateway processes measured: chain = stunnel + sslh + sshd + nginx-proxy (each with its children);" \
  "edgemux and em-raw = the edgemux process (em-raw: the same process, reached by the raw-SSH tunnel);" \
  "sandhole = the sandhole process"

# ------------------------------------------------------------------ helpers
snap() { "${PROCS[@]}" snap "$W/$1.json" --gw "$2" --ours "$(ours)"; }
# sets GW_CPU (s) and NOISY ("" or " [noisy]"); returns 1 when noisy
cpu_after() { # snapA snapB
  local gw other cap noisy
  read -r gw other cap noisy < <("${PROCS[@]}" diff "$W/$1.json" "$W/$2.json")
  GW_CPU=$gw
  if [ "$noisy" = 1 ]; then
    NOISY=" [noisy]"; echo "    other processes used ${other} of ${cap} CPU-s: figure suspect"; return 1
  fi
  NOISY=""; return 0
}
mem_of() { "${PROCS[@]}" mem "$1"; }   # -> rss_kib pss_kib procs threads
mem_detail() { # system label
  if [ "$1" = sandhole ]; then
    "${PROCS[@]}" mem-detail "sandhole=$SH_PID"
  elif [ "$1" = chain ]; then
    "${PROCS[@]}" mem-detail "stunnel=$(pidof_file stunnel)" "sslh=$(pidof_file sslh)" \
      "sshd=$(pidof_file sshd)" "nginx-proxy=$(pidof_file nginx-proxy)"
  else
    "${PROCS[@]}" mem-detail "edgemux=$EM_PID"
  fi
}
mib() { awk -v k="$1" 'BEGIN{printf "%.1f", k/1024}'; }
ORDER_I=0
PAIR=""
pair() { # [systems] : rotate which system goes first, workload by workload: sets PAIR
  local -a list
  read -ra list <<<"${1:-$SYSTEMS}"
  local n=${#list[@]} i out=()
  ORDER_I=$((ORDER_I + 1))
  for ((i = 0; i < n; i++)); do out+=("${list[(i + ORDER_I) % n]}"); done
  PAIR="${out[*]}"
}

# table rows: label | better (higher|lower) | chain | edgemux | em-raw | sandhole
ROWS=()
row() { ROWS+=("$1|$2|$3|$4|${5:--}|${6:--}"); }
rowv() { # label better key : a row from V[system.key] of every system
  ROWS+=("$1|$2|${V[chain.$3]:--}|${V[edgemux.$3]:--}|${V[em-raw.$3]:--}|${V[sandhole.$3]:--}")
}
declare -A V   # V[sys.metric] = value (or "n/a ..." text); noisy values get a trailing *

# ------------------------------------------------------------------ idle memory
hdr "memory at idle (one tunnel connected, no traffic)"
sleep 1
for s in $SYSTEMS; do
  read -r rss pss np nt < <(mem_of "${GW[$s]}")
  V[$s.idle_rss]=$(mib "$rss"); V[$s.idle_pss]=$(mib "$pss")
  echo "  $s: $np processes, $nt threads, RSS $(mib "$rss") MiB, PSS $(mib "$pss") MiB"
  [ "$s" = em-raw ] || mem_detail "$s"
done
rowv "RSS idle, MiB (gateway processes summed)" lower idle_rss
rowv "PSS idle, MiB" lower idle_pss

# ------------------------------------------------------------------ bulk download
if step bulk; then
  hdr "bulk download: GET /big ($BIG_SIZE_MB MiB) through the tunnel, curl, best of $BULK_REPS; MB/s = 10^6 B/s"
  declare -A BEST BESTCPU BESTN
  for s in $SYSTEMS; do BEST[$s]=0; BESTCPU[$s]=""; BESTN[$s]=""; done
  for ((r = 1; r <= BULK_REPS; r++)); do
    pair; for s in $PAIR; do
      for ((try = 0; try <= RETRIES; try++)); do
        wait_quiet
        snap b0 "${GW[$s]}"
        res=$(curl -sk --max-time 300 --resolve "${HOST[$s]}:${PORT[$s]}:127.0.0.1" -o /dev/null \
          -w '%{http_code} %{size_download} %{time_total} %{speed_download}' "https://${HOST[$s]}:${PORT[$s]}/big")
        snap b1 "${GW[$s]}"
        read -r code size secs bps <<<"$res"
        mbs=$(awk -v b="${bps:-0}" 'BEGIN{printf "%.0f", b/1e6}')
        cpu_after b0 b1; ok=$?
        cpg=$(awk -v c="$GW_CPU" -v b="${size:-0}" 'BEGIN{ if (b > 0) printf "%.2f", c / (b / 1073741824); else printf "?" }')
        echo "  $s rep $r: HTTP $code, $size B in ${secs}s = $mbs MB/s; gateway CPU ${GW_CPU}s = $cpg s/GiB$NOISY"
        [ $ok = 0 ] && break
      done
      if [ "$code" = 200 ] && [ "$mbs" -gt "${BEST[$s]}" ]; then
        BEST[$s]=$mbs; BESTCPU[$s]=$cpg; BESTN[$s]=$NOISY
      fi
    done
  done
  for s in $SYSTEMS; do
    V[$s.bulk]="${BEST[$s]}${BESTN[$s]:+*}"; V[$s.bulkcpu]="${BESTCPU[$s]:-?}${BESTN[$s]:+*}"
    [ "${BEST[$s]}" = 0 ] && V[$s.bulk]="failed"
  done
  rowv "bulk download 1 GiB, MB/s" higher bulk
  rowv "gateway CPU s per GiB downloaded" lower bulkcpu
fi

# ------------------------------------------------------------------ upload
if step upload; then
  hdr "upload: PUT $UPLOAD_MB MiB through the tunnel (curl -T, no Expect)"
  head -c $((UPLOAD_MB * 1048576)) "$CHAIN_DIR/www/big" > "$W/up.bin"
  # chain: its tunnel only reaches the backend nginx, and its proxy nginx keeps the default
  # client_max_body_size (1 MiB): try once, to show what a client gets
  res=$(curl -sk --max-time 60 --resolve "app.gw.test:$TLS_PORT:127.0.0.1" -H 'Expect:' -T "$W/up.bin" \
    -o "$W/up-chain.txt" -w '%{http_code} %{size_upload}' "https://app.gw.test:$TLS_PORT/upload")
  read -r code size <<<"$res"
  echo "  chain: HTTP $code after $size B sent ($(head -c 120 "$W/up-chain.txt" | tr -s '\n\r' ' ' | sed 's/<[^>]*>//g'))"
  if [ "$code" = 413 ]; then V[chain.up]="n/a (HTTP 413)"; else V[chain.up]="n/a (HTTP $code, no sink)"; fi
  # the others: an upload sink on another port, tunnelled the same way as each one's backend
  python3 "$BENCH/sink.py" "$SINK_PORT" >"$W/sink.log" 2>&1 &
  SINK_PID=$!
  declare -A UP_HOST=([edgemux]=up-$KEYID.gw.test [em-raw]=upraw-$KEYID.gw.test [sandhole]=up.gw.test)
  setsid ssh "${EM_SSH[@]}" -v -E "$W/sink-ssh.log" -R "up:80:127.0.0.1:$SINK_PORT" -l bench gw.test \
    </dev/null >/dev/null 2>&1 &
  SINKTUNS+=("$!")
  setsid ssh "${RAW_SSH[@]}" -v -E "$W/sink-raw-ssh.log" -p "$EDGEMUX_PORT" -R "upraw:80:127.0.0.1:$SINK_PORT" \
    -l bench 127.0.0.1 </dev/null >/dev/null 2>&1 &
  SINKTUNS+=("$!")
  if [ "$SANDHOLE" = 1 ]; then
    setsid ssh "${RAW_SSH[@]}" -v -E "$W/sink-sandhole-ssh.log" -p "$SH_SSH" -R "up:80:127.0.0.1:$SINK_PORT" \
      127.0.0.1 </dev/null >/dev/null 2>&1 &
    SINKTUNS+=("$!")
  fi
  UPSYS=""
  for s in ${SYSTEMS#chain }; do
    ok=0
    for ((i = 0; i < 100; i++)); do
      if [ "$(curl -sk --max-time 2 -d x "https://${UP_HOST[$s]}:${PORT[$s]}/")" = 1 ]; then ok=1; break; fi
      sleep 0.2
    done
    if [ $ok = 1 ]; then UPSYS="$UPSYS $s"; else echo "  $s: upload tunnel did not come up"; V[$s.up]="failed"; fi
    V[$s.upbest]=0
  done
  for ((r = 1; r <= BULK_REPS; r++)); do
    pair "$UPSYS"; for s in $PAIR; do
      for ((try = 0; try <= RETRIES; try++)); do
        wait_quiet
        snap u0 "${GW[$s]}"
        res=$(curl -sk --max-time 300 -H 'Expect:' -T "$W/up.bin" -o "$W/up-$s.txt" \
          -w '%{http_code} %{size_upload} %{time_total} %{speed_upload}' "https://${UP_HOST[$s]}:${PORT[$s]}/")
        snap u1 "${GW[$s]}"
        read -r code size secs bps <<<"$res"
        got=$(tr -dc 0-9 < "$W/up-$s.txt")
        cpu_after u0 u1; ok=$?
        mbs=$(awk -v b="${bps:-0}" 'BEGIN{printf "%.0f", b/1e6}')
        cpg=$(awk -v c="$GW_CPU" -v b="${size:-0}" 'BEGIN{ if (b > 0) printf "%.2f", c / (b / 1073741824); else printf "?" }')
        echo "  $s rep $r: HTTP $code, $size B sent, sink received ${got:-?} B, ${secs}s = $mbs MB/s; gateway CPU ${GW_CPU}s = $cpg s/GiB$NOISY"
        [ $ok = 0 ] && break
      done
      if [ "$code" = 200 ] && [ "${got:-0}" = "$size" ] && [ "$mbs" -gt "${V[$s.upbest]}" ]; then
        V[$s.upbest]=$mbs; V[$s.up]="$mbs${NOISY:+*}"; V[$s.upcpu]="$cpg${NOISY:+*}"
      fi
    done
  done
  for s in $UPSYS; do [ "${V[$s.upbest]}" = 0 ] && V[$s.up]="failed"; done
  for p in "${SINKTUNS[@]}"; do stop_pid "$p" group; done
  SINKTUNS=()
  stop_pid "$SINK_PID"; SINK_PID=""
  rm -f "$W/up.bin"
  V[chain.upcpu]="n/a"
  rowv "upload $UPLOAD_MB MiB, MB/s" higher up
  rowv "gateway CPU s per GiB uploaded" lower upcpu
fi

# ------------------------------------------------------------------ wrk (HTTP/1.1)
if step wrk; then
  hdr "HTTP/1.1: wrk GET /hello (6-byte body), ${DUR}s per run, keep-alive"
  fresh
  printf '  %-8s %5s %10s %10s %10s %s\n' system conns req/s p50_ms p99_ms notes
  for c in $CONNS; do
    th=$(( c < 2 ? c : 2 ))
    pair; for s in $PAIR; do
      for ((try = 0; try <= RETRIES; try++)); do
        wait_quiet
        memjob=""
        if [[ " $MEM_AT " == *" $c "* ]]; then
          ( sleep "$(awk -v d="$DUR" 'BEGIN{print d/2}')"; mem_of "${GW[$s]}" > "$W/mem-load-$s.txt"; mem_detail "$s" > "$W/mem-load-$s-detail.txt" ) &
          memjob=$!
        fi
        snap w0 "${GW[$s]}"
        timeout $((DUR + 30)) wrk -t"$th" -c"$c" -d"${DUR}s" --latency \
          "https://${HOST[$s]}:${PORT[$s]}/hello" > "$W/wrk.txt" 2>&1
        snap w1 "${GW[$s]}"
        [ -n "$memjob" ] && wait "$memjob"
        rps=$(awk '/^Requests\/sec:/{printf "%.0f", $2}' "$W/wrk.txt")
        p50=$(to_ms "$(awk '$1=="50%"{print $2}' "$W/wrk.txt")")
        p99=$(to_ms "$(awk '$1=="99%"{print $2}' "$W/wrk.txt")")
        nreq=$(awk '/requests in/{print $1; exit}' "$W/wrk.txt")
        notes=$(grep -E 'Non-2xx|Socket errors' "$W/wrk.txt" | tr -s ' ' | tr '\n' ' ')
        cpu_after w0 w1; ok=$?
        us=$(awk -v c="$GW_CPU" -v n="${nreq:-0}" 'BEGIN{ if (n > 0) printf "%.0f", 1e6 * c / n; else printf "?" }')
        printf '  %-8s %5s %10s %10s %10s gateway CPU %s us/req %s%s\n' "$s" "$c" "${rps:-?}" "$p50" "$p99" "$us" "$notes" "$NOISY"
        [ $ok = 0 ] && break
      done
      n=${NOISY:+*}; [ -n "$notes" ] && n="$n!"
      V[$s.wrk$c]="${rps:-?}$n"; V[$s.wrk$c.p50]="$p50$n"; V[$s.wrk$c.p99]="$p99$n"
      V[$s.wrk$c.cpu]="$us$n"
      if [ -n "$memjob" ]; then
        read -r rss pss _ _ < "$W/mem-load-$s.txt"
        V[$s.loadrss$c]="$(mib "$rss")$n"; V[$s.loadpss$c]="$(mib "$pss")$n"
        echo "    memory at t=$(awk -v d="$DUR" 'BEGIN{print d/2}')s:"; cat "$W/mem-load-$s-detail.txt"
      fi
    done
    rowv "HTTP/1.1 wrk c=$c, req/s" higher "wrk$c"
    rowv "HTTP/1.1 wrk c=$c, p50 ms" lower "wrk$c.p50"
    rowv "HTTP/1.1 wrk c=$c, p99 ms" lower "wrk$c.p99"
    rowv "HTTP/1.1 wrk c=$c, gateway CPU us/req" lower "wrk$c.cpu"
  done
  for c in $MEM_AT; do
    [[ " $CONNS " == *" $c "* ]] || continue
    rowv "RSS under wrk c=$c, MiB" lower "loadrss$c"
    rowv "PSS under wrk c=$c, MiB" lower "loadpss$c"
  done
  echo "  command: wrk -t{1|2} -cC -d${DUR}s --latency https://HOST:PORT/hello (HOST in /etc/hosts)"
fi

# ------------------------------------------------------------------ h2load (h2)
if step h2; then
  hdr "h2: h2load GET /hello, ${DUR}s per run, 1 stream per connection (-m 1)"
  echo "  (the chain offers no ALPN: stunnel does not speak h2, h2load falls back to HTTP/1.1 there)"
  printf '  %-8s %5s %10s %10s %10s %s\n' system conns req/s p50_ms p99_ms protocol
  for c in $H2_CONNS; do
    th=$(( c < 2 ? c : 2 ))
    pair; for s in $PAIR; do
      for ((try = 0; try <= RETRIES; try++)); do
        wait_quiet
        rm -f "$W/h2load.log"
        snap h0 "${GW[$s]}"
        timeout $((DUR + 30)) h2load -c"$c" -t"$th" -m1 -D"$DUR" --connect-to="127.0.0.1:${PORT[$s]}" \
          --log-file="$W/h2load.log" "https://${HOST[$s]}:${PORT[$s]}/hello" > "$W/h2load.txt" 2>&1
        snap h1 "${GW[$s]}"
        rps=$(awk '/^finished in/{for(i=1;i<=NF;i++) if($(i+1) ~ /^req\/s/) printf "%.0f", $i}' "$W/h2load.txt")
        okreq=$(awk '/^requests:/{for(i=1;i<=NF;i++) if($(i+1) ~ /^succeeded/) print $i}' "$W/h2load.txt")
        failreq=$(awk '/^requests:/{for(i=1;i<=NF;i++) if($(i+1) ~ /^failed/) print $i}' "$W/h2load.txt")
        proto=$(grep -m1 -o 'Application protocol: [^ ]*' "$W/h2load.txt" | awk '{print $3}')
        grep -q 'Falling back to HTTP/1.1' "$W/h2load.txt" && proto="http/1.1 (fallback)"
        read -r p50 p99 < <("${PROCS[@]}" pct "$W/h2load.log" 3 0.001 50 99)
        cpu_after h0 h1; ok=$?
        printf '  %-8s %5s %10s %10s %10s %s; %s ok, %s failed%s\n' "$s" "$c" "${rps:-?}" "$p50" "$p99" "${proto:-?}" "${okreq:-?}" "${failreq:-?}" "$NOISY"
        [ $ok = 0 ] && break
      done
      n=${NOISY:+*}; [ "${failreq:-1}" != 0 ] && n="$n!"
      case "$proto" in h2) f="" ;; *) f=" (h1)" ;; esac
      V[$s.h2$c]="${rps:-?}$n$f"; V[$s.h2$c.p50]="$p50$n$f"; V[$s.h2$c.p99]="$p99$n$f"
    done
    rowv "h2 h2load c=$c, req/s" higher "h2$c"
    rowv "h2 h2load c=$c, p50 ms" lower "h2$c.p50"
    rowv "h2 h2load c=$c, p99 ms" lower "h2$c.p99"
  done
  echo "  command: h2load -cC -t{1|2} -m1 -D$DUR --connect-to=127.0.0.1:PORT https://HOST:PORT/hello"
fi

# ------------------------------------------------------------------ memory after the load
if step wrk || step h2; then
  hdr "memory ${AFTER_WAIT} s after the load (wrk and h2load) ended"
  sleep "$AFTER_WAIT"
  for s in $SYSTEMS; do
    read -r rss pss _ _ < <(mem_of "${GW[$s]}")
    V[$s.after]=$(mib "$rss")
    echo "  $s: RSS $(mib "$rss") MiB, PSS $(mib "$pss") MiB"
  done
  rowv "RSS $AFTER_WAIT s after the load, MiB" lower after
fi

# ------------------------------------------------------------------ handshakes
if step handshake; then
  hdr "new TLS connections: openssl s_time -new (no resumption), 1 client process, ${DUR}s"
  for kind in hs get; do
    pair "chain edgemux"; for s in $PAIR; do
      W_ARGS=()
      if [ $kind = get ]; then
        # s_time sends "GET <page> HTTP/1.0": the page smuggles Host and Connection: close
        W_ARGS=(-www $'/hello HTTP/1.1\r\nHost: '"${HOST[$s]}"$'\r\nConnection: close\r\nX-Pad: x')
      fi
      for ((try = 0; try <= RETRIES; try++)); do
        wait_quiet
        snap s0 "${GW[$s]}"; t0=$(date +%s.%N)
        timeout $((DUR + 30)) openssl s_time -connect "127.0.0.1:${PORT[$s]}" -new -time "$DUR" "${W_ARGS[@]}" > "$W/stime.txt" 2>&1
        t1=$(date +%s.%N); snap s1 "${GW[$s]}"
        n=$(awk '/connections in .*real seconds/{print $1; exit}' "$W/stime.txt")
        bpc=$(awk '/real seconds/{for(i=1;i<=NF;i++) if($i=="bytes") print $(i-1)}' "$W/stime.txt" | head -1)
        rate=$(awk -v n="${n:-0}" -v a="$t0" -v b="$t1" 'BEGIN{printf "%.0f", n/(b-a)}')
        cpu_after s0 s1; ok=$?
        us=$(awk -v c="$GW_CPU" -v n="${n:-0}" 'BEGIN{ if (n > 0) printf "%.0f", 1e6 * c / n; else printf "?" }')
        echo "  $s $( [ $kind = hs ] && echo 'handshake only' || echo 'new conn + GET /hello') : ${n:-?} connections = $rate conn/s$( [ $kind = get ] && echo ", $bpc B read per conn"); gateway CPU $us us/conn$NOISY"
        [ $ok = 0 ] && break
      done
      V[$s.$kind]="$rate${NOISY:+*}"
      [ "${n:-0}" = 0 ] && V[$s.$kind]="failed"
    done
  done
  row "new TLS handshakes/s (s_time -new, 1 client)" higher "${V[chain.hs]}" "${V[edgemux.hs]}"
  row "new TLS conn + GET /hello per s (s_time)" higher "${V[chain.get]}" "${V[edgemux.get]}"
fi

# ------------------------------------------------------------------ time to first byte
if step ttfb; then
  hdr "time to first byte: $TTFB_N fresh curl connections each (TCP connect + TLS + GET /hello), interleaved"
  wait_quiet
  : > "$W/ttfb-chain.txt"; : > "$W/ttfb-edgemux.txt"
  for ((i = 0; i < TTFB_N; i++)); do
    pair "chain edgemux"; for s in $PAIR; do
      curl -sk --max-time 10 --resolve "${HOST[$s]}:${PORT[$s]}:127.0.0.1" -o /dev/null \
        -w '%{http_code} %{time_connect} %{time_starttransfer}\n' "https://${HOST[$s]}:${PORT[$s]}/hello" >> "$W/ttfb-$s.txt"
    done
  done
  for s in chain edgemux; do
    bad=$(awk '$1!=200' "$W/ttfb-$s.txt" | wc -l)
    read -r m p90 < <("${PROCS[@]}" pct "$W/ttfb-$s.txt" 3 1000 50 90)
    echo "  $s: time_starttransfer median $m ms, p90 $p90 ms ($bad non-200)"
    V[$s.ttfb]=$m; V[$s.ttfb90]=$p90
  done
  row "time to first byte, fresh conn, median ms" lower "${V[chain.ttfb]}" "${V[edgemux.ttfb]}"
  row "time to first byte, fresh conn, p90 ms" lower "${V[chain.ttfb90]}" "${V[edgemux.ttfb90]}"
fi

# ------------------------------------------------------------------ idle ssh -R tunnels
if step tunnels; then
  # measured: ~3.4 MiB PSS per tunnel client side (ssh + openssl s_client), ~2 MiB on the chain side
  avail=$(awk '/MemAvailable/{print int($2/1024)}' /proc/meminfo)
  cap=$(( (avail - 4096) / 8 ))
  nt=$TUNNELS
  [ "$nt" -gt "$cap" ] && { echo "run: only ${avail} MiB available: TUNNELS $TUNNELS -> $cap"; nt=$cap; }
  hdr "$nt idle ssh -R tunnels (real ssh + s_client ProxyCommand each, 8 logins at a time), on top of the main one"
  fresh
  pair "chain edgemux"; for s in $PAIR; do
    wait_quiet
    rm -f "$W/tunnels-$s.ready"
    if [ "$s" = chain ]; then
      args=(--kind chain --port "$TLS_PORT" --key "$CHAIN_DIR/ssh/client_ed25519" --user "$TEST_USER"
            --known-hosts "$CHAIN_DIR/ssh/known_hosts")
    else
      args=(--kind edgemux --port "$EDGEMUX_PORT" --key "$W/client_ed25519" --user bench)
    fi
    python3 "$BENCH/tunnels.py" "${args[@]}" --count "$nt" --logdir "$W/tunnels-$s" \
      --ready "$W/tunnels-$s.ready" --target "127.0.0.1:$BACKEND_PORT" >"$W/tunnels-$s.out" 2>&1 &
    HELPER_PID=$!
    t0=$SECONDS
    while [ ! -s "$W/tunnels-$s.ready" ] && [ -d "/proc/$HELPER_PID" ] && [ $((SECONDS - t0)) -lt 700 ]; do sleep 1; done
    info=$(cat "$W/tunnels-$s.ready" 2>/dev/null)
    up=$(grep -o 'up=[0-9]*' <<<"$info" | cut -d= -f2)
    sleep 3   # let the gateway settle (sshd privsep children, buffers)
    read -r rss pss np nth < <(mem_of "${GW[$s]}")
    read -r crss cpss cnp _ < <(mem_of "$HELPER_PID")
    extra=""
    if [ "$s" = edgemux ]; then
      extra=", edgemux lists $(curl -s --max-time 10 "http://127.0.0.1:$ADMIN_PORT/tunnels" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["tunnels"]))' 2>/dev/null) tunnels"
    fi
    echo "  $s: ${info:-helper failed} (in $((SECONDS - t0)) s)$extra"
    echo "    gateway: $np processes, $nth threads, RSS $(mib "$rss") MiB, PSS $(mib "$pss") MiB"
    mem_detail "$s"
    echo "    (tunnel clients, not counted: $cnp processes, RSS $(mib "$crss") MiB, PSS $(mib "$cpss") MiB;" \
      "MemAvailable now $(awk '/MemAvailable/{print int($2/1024)}' /proc/meminfo) MiB)"
    if [ "${up:-0}" -gt 0 ]; then
      V[$s.tun]=$(mib "$rss"); V[$s.tunpss]=$(mib "$pss")
      V[$s.tunper]=$(awk -v a="$rss" -v b="${BASE_RSS[$s]}" -v n="$up" 'BEGIN{printf "%.0f", (a-b)/n}')
      V[$s.tunpssper]=$(awk -v a="$pss" -v b="${BASE_PSS[$s]}" -v n="$up" 'BEGIN{printf "%.0f", (a-b)/n}')
      [ "$up" != "$nt" ] && for k in tun tunpss; do V[$s.$k]="${V[$s.$k]} ($up up)"; done
    else
      V[$s.tun]="failed"; V[$s.tunpss]="failed"
    fi
    stop_pid "$HELPER_PID"; HELPER_PID=""
    sleep 2
  done
  row "RSS with $nt idle ssh -R tunnels, MiB" lower "${V[chain.tun]:-?}" "${V[edgemux.tun]:-?}"
  row "PSS with $nt idle ssh -R tunnels, MiB" lower "${V[chain.tunpss]:-?}" "${V[edgemux.tunpss]:-?}"
  row "  RSS per extra tunnel, KiB" lower "${V[chain.tunper]:-?}" "${V[edgemux.tunper]:-?}"
  row "  PSS per extra tunnel, KiB" lower "${V[chain.tunpssper]:-?}" "${V[edgemux.tunpssper]:-?}"
fi

# ------------------------------------------------------------------ idle TLS connections
if step idletls; then
  hdr "$IDLE_TLS idle HTTPS keep-alive connections (TLS handshake + one GET /hello each, then silent)"
  fresh
  pair "chain edgemux"; for s in $PAIR; do
    n=$IDLE_TLS
    if [ "$s" = chain ]; then
      # sslh-fork forks a process and stunnel starts a thread per connection: stay inside pid_max
      tasks=$(awk '{split($4, a, "/"); print a[2]}' /proc/loadavg)
      budget=$(( ($(cat /proc/sys/kernel/pid_max) - tasks - 6000) / 2 ))
      [ "$n" -gt "$budget" ] && { echo "  chain: capped at $budget connections (pid_max budget)"; n=$budget; }
    fi
    wait_quiet
    rss0=${BASE_RSS[$s]} pss0=${BASE_PSS[$s]}
    rm -f "$W/idle-$s.ready" "$W/idle-$s.ready.end"
    python3 "$BENCH/idle_tls.py" --port "${PORT[$s]}" --host "${HOST[$s]}" --count "$n" \
      --ready "$W/idle-$s.ready" >"$W/idle-$s.out" 2>&1 &
    HELPER_PID=$!
    t0=$SECONDS
    while [ ! -s "$W/idle-$s.ready" ] && [ -d "/proc/$HELPER_PID" ] && [ $((SECONDS - t0)) -lt 400 ]; do sleep 1; done
    info=$(cat "$W/idle-$s.ready" 2>/dev/null)
    held=$(grep -o 'held=[0-9]*' <<<"$info" | cut -d= -f2)
    sleep 2
    read -r rss pss np nth < <(mem_of "${GW[$s]}")
    stop_pid "$HELPER_PID"; HELPER_PID=""
    still=$(cut -d= -f2 "$W/idle-$s.ready.end" 2>/dev/null)
    echo "  $s: ${info:-helper failed} (in $((SECONDS - t0)) s); still open at measurement: ${still:-?}"
    echo "    gateway: $np processes, $nth threads, RSS $(mib "$rss") MiB, PSS $(mib "$pss") MiB"
    if [ "${held:-0}" -gt 0 ]; then
      V[$s.idle]=$(mib "$rss"); V[$s.idlepss]=$(mib "$pss")
      V[$s.idleper]=$(awk -v a="$rss" -v b="$rss0" -v n="${still:-$held}" 'BEGIN{ if (n > 0) printf "%.1f", (a-b)/n; else printf "?" }')
      V[$s.idlepssper]=$(awk -v a="$pss" -v b="$pss0" -v n="${still:-$held}" 'BEGIN{ if (n > 0) printf "%.1f", (a-b)/n; else printf "?" }')
      [ "${still:-$held}" != "$IDLE_TLS" ] && for k in idle idlepss; do V[$s.$k]="${V[$s.$k]} (${still:-$held} held)"; done
    else
      V[$s.idle]="failed"; V[$s.idlepss]="failed"
    fi
    sleep 3
  done
  row "RSS with $IDLE_TLS idle TLS conns, MiB" lower "${V[chain.idle]:-?}" "${V[edgemux.idle]:-?}"
  row "PSS with $IDLE_TLS idle TLS conns, MiB" lower "${V[chain.idlepss]:-?}" "${V[edgemux.idlepss]:-?}"
  row "  RSS per idle conn, KiB" lower "${V[chain.idleper]:-?}" "${V[edgemux.idleper]:-?}"
  row "  PSS per idle conn, KiB" lower "${V[chain.idlepssper]:-?}" "${V[edgemux.idlepssper]:-?}"
fi

# ------------------------------------------------------------------ memory after
hdr "memory after the load (idle again)"
sleep 2
for s in chain edgemux; do
  read -r rss pss np nt < <(mem_of "${GW[$s]}")
  echo "  $s: $np processes, $nt threads, RSS $(mib "$rss") MiB, PSS $(mib "$pss") MiB"
done

# ------------------------------------------------------------------ table
hdr "summary: chain (stunnel+sslh+sshd+nginx), edgemux (SSH inside TLS), edgemux raw SSH, Sandhole; same backend, same run"
ratio() { # base other -> other/base
  awk -v a="$1" -v b="$2" 'BEGIN{
    if (a ~ /^[0-9.]+/ && b ~ /^[0-9.]+/) { a += 0; b += 0; if (a > 0) printf "%.2fx", b / a; else printf "-" }
    else printf "-" }'
}
FMT='%-46s | %16s | %16s | %16s | %16s | %8s | %8s | %s\n'
# shellcheck disable=SC2059
printf "$FMT" workload chain edgemux "edgemux raw" sandhole "em/chain" "raw/sh" better
printf '%s\n' "$(printf '%.0s-' {1..160})"
for r in "${ROWS[@]}"; do
  IFS='|' read -r label better a b c d <<<"$r"
  # shellcheck disable=SC2059
  printf "$FMT" "$label" "$a" "$b" "$c" "$d" "$(ratio "$a" "$b")" "$(ratio "$d" "$c")" "$better"
done
echo
echo "em/chain = edgemux (SSH inside TLS) / chain; raw/sh = edgemux raw SSH / Sandhole (like for like)."
echo "Above 1.00x is better for 'higher' rows, below 1.00x for 'lower' rows."
echo "edgemux and edgemux raw are one process reached by two tunnel clients: their idle and after-load"
echo "memory is the same process's; '-': not measured for that system (see bench/README.md)."
echo "*  = other processes used >10% of the machine during that measurement (after $RETRIES retry): suspect."
echo "!  = errors (non-2xx or socket errors) during that run; see the log above."
echo "(h1) = HTTP/1.1: the chain and Sandhole offer no h2 over ALPN, h2load fell back."
echo "Memory: sums over the gateway processes (chain: stunnel+sslh+sshd+nginx-proxy with children;"
echo "RSS double-counts pages shared between forked processes, PSS does not)."
