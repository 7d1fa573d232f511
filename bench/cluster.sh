#!/bin/bash
# Two edgemux replicas in one [cluster], on 127.0.0.1: the same tunnel reached directly (the
# visitor lands on r1, which holds the tunnel's SSH client) and hopped (the visitor lands on r2,
# which opens a stream to r1 over the peer link), side by side, in one run.
#
#   bash bench/cluster.sh                   (as root: installs its packages with apt-get)
#
# Starts etcd, the backend nginx (/big = 1 GiB random file, /hello), replicas r1 and r2 (release
# build) and one `ssh -R` tunnel client on r1, then runs every workload via r1 and via r2,
# alternating which goes first, each after waiting for a quiet machine, and prints one table with
# hopped/direct against the targets of SCALEOUT §4.4. Everything is bounded in count and time;
# every process started here is stopped on exit. Knobs (environment) are in bench/README.md.
set -euo pipefail
export LC_ALL=C

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$REPO/bench
# shellcheck source=lib.sh
. "$BENCH/lib.sh"   # hdr, listening, stop_pid, busy_pct, wait_quiet, to_ms

DUR=${BENCH_DURATION:-10}
CONNS=${CONNS:-1 16 64}
H2_CONNS=${H2_CONNS:-64}
STEPS=${STEPS:-bulk wrk h2}
BULK_REPS=${BULK_REPS:-2}
BIG_MB=${BIG_MB:-1024}
QUIET_PCT=${QUIET_PCT:-10}
QUIET_WAIT=${QUIET_WAIT:-60}
RETRIES=${RETRIES:-1}
# etcd and nginx are given their ports: free ones, picked now, unless set
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ETCD_PORT=${ETCD_PORT:-$(free_port)}
ETCD_PEER_PORT=${ETCD_PEER_PORT:-$(free_port)}
BACKEND_PORT=${BACKEND_PORT:-$(free_port)}
SSH_CIPHER=${SSH_CIPHER:-}
OUT_ROOT=${BENCH_OUT:-/tmp/edgemux-bench}
PKGS="etcd-server nginx wrk nghttp2-client curl openssl openssh-client python3 iproute2 procps"
step() { [[ " $STEPS " == *" $1 "* ]]; }
die() { echo "cluster: $*" >&2; exit 1; }

# The targets (SCALEOUT §4.4): hopped/direct for bulk and for req/s at c=64; added p50 at the
# smallest connection count (c=1: no queueing).
TARGET_BULK=0.85
TARGET_RPS=0.80
TARGET_ADDED_P50_MS=0.3

STAMP=$(date +%Y%m%d-%H%M%S)
W=$OUT_ROOT/cluster-$STAMP
mkdir -p "$W" "$OUT_ROOT/results"
OUT=$OUT_ROOT/results/cluster-$STAMP.txt
exec > >(tee "$OUT") 2>&1
PROCS=(python3 "$BENCH/procs.py")

# ------------------------------------------------------------------ cleanup
ETCD_PID="" NGINX_PID="" TUN_PID=""
declare -A PID=([r1]="" [r2]="")
cleanup() {
  trap - EXIT INT TERM
  echo
  echo "cluster: cleaning up"
  stop_pid "$TUN_PID" group
  stop_pid "${PID[r2]}"
  stop_pid "${PID[r1]}"
  stop_pid "$NGINX_PID"
  stop_pid "$ETCD_PID"
  rm -rf "$W/etcd"
  echo "cluster: output saved to $OUT (logs under $W)"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------ packages, build
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  [ "$(id -u)" = 0 ] || die "missing packages:$missing (apt-get install -y$missing, as root)"
  hdr "packages: installing$missing"
  # Debian's postinst may start etcd on :2379 and nginx on :80 (where systemd runs): the
  # benchmark's own instances use other ports and do not depend on them.
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

build_edgemux

for p in $ETCD_PORT $ETCD_PEER_PORT $BACKEND_PORT; do
  listening "$p" && die "port 127.0.0.1:$p is in use (set ETCD_PORT / ETCD_PEER_PORT / BACKEND_PORT)"
done

# ------------------------------------------------------------------ etcd, backend
wait_for() { # what seconds command... : poll every 0.1 s
  local what=$1 secs=$2 i; shift 2
  for ((i = 0; i < secs * 10; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "$what not up after $secs s (logs under $W)"
}

hdr "etcd on 127.0.0.1:$ETCD_PORT"
etcd --name bench --data-dir "$W/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "bench=http://127.0.0.1:$ETCD_PEER_PORT" >"$W/etcd.log" 2>&1 &
ETCD_PID=$!
etcd_healthy() { curl -sf --max-time 1 "http://127.0.0.1:$ETCD_PORT/health" | grep -q '"health":"true"'; }
wait_for etcd 15 etcd_healthy

hdr "backend nginx on 127.0.0.1:$BACKEND_PORT (/big = $BIG_MB MiB random, /hello)"
WWW=$OUT_ROOT/www   # kept between runs: writing 1 GiB of random bytes takes a while
mkdir -p "$WWW" "$W/nginx"
chmod 755 "$OUT_ROOT" "$WWW"
if [ "$(stat -c %s "$WWW/big" 2>/dev/null || echo 0)" != $((BIG_MB * 1048576)) ]; then
  echo "writing $WWW/big"
  head -c $((BIG_MB * 1048576)) /dev/urandom > "$WWW/big"
fi
chmod 644 "$WWW/big"
# the same settings as the chain's backend (../shared/bench/chain/setup.sh)
cat > "$W/nginx.conf" <<NGINX
user www-data;
worker_processes auto;
pid $W/nginx.pid;
error_log $W/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_timeout 65;
  keepalive_requests 10000000;
  default_type application/octet-stream;
  client_body_temp_path $W/nginx/body;
  proxy_temp_path $W/nginx/proxy;
  fastcgi_temp_path $W/nginx/fastcgi;
  uwsgi_temp_path $W/nginx/uwsgi;
  scgi_temp_path $W/nginx/scgi;
  server {
    listen 127.0.0.1:$BACKEND_PORT default_server backlog=4096;
    root $WWW;
    location = /hello { default_type text/plain; return 200 "hello\n"; }
    location = /big { }
  }
}
NGINX
nginx -q -t -e "$W/nginx-error.log" -c "$W/nginx.conf"
nginx -e "$W/nginx-error.log" -c "$W/nginx.conf" -g 'daemon off;' &
NGINX_PID=$!
backend_up() { [ "$(curl -s --max-time 1 "http://127.0.0.1:$BACKEND_PORT/hello")" = hello ]; }
wait_for "backend nginx" 5 backend_up

# ------------------------------------------------------------------ replicas, tunnel
hdr "replicas r1 and r2 (cluster \"bench\")"
# both serve the same self-signed gw.test + *.gw.test certificate
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$W/tls.key" \
  -out "$W/tls.crt" -days 30 -subj /CN=gw.test -addext "subjectAltName=DNS:gw.test,DNS:*.gw.test" 2>/dev/null
(umask 077 && "$BIN" cluster-secret > "$W/secret")
declare -A PORT ADMIN PEER
start_replica() { # name
  local r=$1
  mkdir -p "$W/$r/certs"
  # as in run.sh: header_timeout = nginx's keepalive_timeout, a short drain to stop quickly
  cat > "$W/$r.toml" <<TOML
domain = "gw.test"

[[listener]]
bind = "127.0.0.1:0"

[tls]
certs_dir = "$W/$r/certs"
[[tls.certificate]]
cert = "$W/tls.crt"
key = "$W/tls.key"

[ssh]
host_key = "$W/$r/hostkey"

[limits]
header_timeout = "65s"
drain_timeout = "2s"

[admin]
bind = "127.0.0.1:0"

[cluster]
name = "bench"
replica_name = "$r"
endpoints = ["http://127.0.0.1:$ETCD_PORT"]
secret_file = "$W/secret"

[cluster.peer]
bind = "127.0.0.1:0"
TOML
  "$BIN" check -c "$W/$r.toml" >/dev/null || die "edgemux rejected $W/$r.toml"
  # warn: no per-request log lines
  RUST_LOG=${EDGEMUX_LOG:-warn} "$BIN" serve -c "$W/$r.toml" >"$W/$r.out" 2>"$W/$r.log" &
  PID[$r]=$!
  wait_for "$r" 15 grep -q '^ready' "$W/$r.out"
  PORT[$r]=$(awk '$1=="listening"{sub(/.*:/, "", $2); print $2; exit}' "$W/$r.out")
  ADMIN[$r]=$(awk '$1=="admin"{print $2; exit}' "$W/$r.out")
  PEER[$r]=$(awk '$1=="peer"{print $2; exit}' "$W/$r.out")
  echo "$r: pid ${PID[$r]}, listening 127.0.0.1:${PORT[$r]}, peer ${PEER[$r]}, admin ${ADMIN[$r]}"
}
start_replica r1
start_replica r2

ssh-keygen -q -t ed25519 -N '' -C edgemux-bench -f "$W/client_ed25519"
KEYID=$("$BIN" keyid "$W/client_ed25519.pub")
HOST=app-$KEYID.gw.test
SSH_OPTS=(-n -N -F /dev/null -i "$W/client_ed25519" -o IdentitiesOnly=yes -o BatchMode=yes
  -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ExitOnForwardFailure=yes
  -o ServerAliveInterval=30
  -o "ProxyCommand=openssl s_client -quiet -connect 127.0.0.1:${PORT[r1]} -servername gw.test")
[ -n "$SSH_CIPHER" ] && SSH_OPTS+=(-c "$SSH_CIPHER")
setsid ssh "${SSH_OPTS[@]}" -v -E "$W/tunnel-ssh.log" -R "app:80:127.0.0.1:$BACKEND_PORT" -l bench gw.test \
  </dev/null >/dev/null 2>&1 &
TUN_PID=$!

# direct = the visitor lands on r1 (the tunnel's replica), hopped = on r2
declare -A VIA=([direct]=r1 [hopped]=r2)
url() { echo "https://$HOST:${PORT[${VIA[$1]}]}$2"; }
resolve() { echo "$HOST:${PORT[${VIA[$1]}]}:127.0.0.1"; }
serves() { [ "$(curl -sk --max-time 2 --resolve "$(resolve "$1")" "$(url "$1" /hello)")" = hello ]; }
t0=$(date +%s.%N)
wait_for "the tunnel via r1" 30 serves direct
t1=$(date +%s.%N)
wait_for "the tunnel via r2 (r1's directory entry)" 30 serves hopped
t2=$(date +%s.%N)
echo "tunnel client pid $TUN_PID: $(url direct /hello) -> hello after" \
  "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') s; via r2 $(url hopped /hello) after" \
  "$(awk -v a="$t1" -v b="$t2" 'BEGIN{printf "%.1f", b-a}') s more"

# ------------------------------------------------------------------ environment
hdr "environment ($(date -u '+%Y-%m-%d %H:%M:%S UTC'))"
echo "kernel: $(uname -r)   cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc)   mem: $(free -g | awk '/Mem:/{print $2}') GiB"
echo "edgemux: $("$BIN" --version) @ $(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$REPO" && git diff --quiet HEAD 2>/dev/null || echo ' (+uncommitted changes)')"
echo "tools: $(dpkg-query -W -f='${Package}=${Version} ' $PKGS 2>/dev/null)"
echo "ssh cipher (tunnel client to r1): $(grep -m1 -o 'kex: server->client cipher: [^ ]*' "$W/tunnel-ssh.log" | awk '{print $4}' || true)," \
  "RUST_LOG=${EDGEMUX_LOG:-warn}"
echo "knobs: BENCH_DURATION=$DUR CONNS='$CONNS' H2_CONNS='$H2_CONNS' STEPS='$STEPS' BULK_REPS=$BULK_REPS" \
  "QUIET_PCT=$QUIET_PCT QUIET_WAIT=$QUIET_WAIT RETRIES=$RETRIES"
echo "CPU figures: utime+stime of r1 and r2 (the gateway processes); etcd, nginx, the tunnel client" \
  "and the load generators are not counted"

# ------------------------------------------------------------------ measuring
CLK=$(getconf CLK_TCK)
cpu_s() { sed 's/^.*) //' "/proc/$1/stat" | awk -v hz="$CLK" '{printf "%.3f", ($12 + $13) / hz}'; }
# From the admin /metrics: the SSH channels r1 opened to the tunnel client, and the peer streams
# r2 opened to r1 (with the time each took to open, TCP + TLS + the owner's channel open). With
# upstream keep-alive (across the hop too), both grow far more slowly than the requests.
scrape() { curl -s --max-time 5 "http://${ADMIN[$1]}/metrics" || true; }
sample() { # metrics-text name label... -> sum of the samples of `name` that carry every label
  awk -v name="$2" -v labels="${*:3}" 'BEGIN { n = split(labels, want, " ") }
    index($0, name) == 1 { ok = 1; for (i = 1; i <= n; i++) if (!index($0, want[i])) ok = 0; if (ok) s += $NF }
    END { printf "%.6f", s }' <<<"$1"
}
# before/after one measurement: CPU of r1 and r2, the counters above, other load (procs.py)
declare -A M
mark() { # name
  local m1 m2
  [ -d "/proc/${PID[r1]}" ] && [ -d "/proc/${PID[r2]}" ] || die "a replica has exited: see $W/r1.log, $W/r2.log"
  "${PROCS[@]}" snap "$W/$1.json" --gw "${PID[r1]},${PID[r2]}" --ours "$$"
  M[$1.r1]=$(cpu_s "${PID[r1]}"); M[$1.r2]=$(cpu_s "${PID[r2]}")
  m1=$(scrape r1); m2=$(scrape r2)
  M[$1.chan]=$(sample "$m1" edgemux_forwarded_channels_total 'result="opened"')
  M[$1.peer]=$(sample "$m2" edgemux_peer_streams_total 'side="out"' 'outcome="ok"')
  M[$1.open_s]=$(sample "$m2" edgemux_peer_open_seconds_sum 'side="out"')
  M[$1.open_n]=$(sample "$m2" edgemux_peer_open_seconds_count 'side="out"')
}
delta() { # markA markB counter format -> its growth between the two marks
  awk -v a="${M[$1.$3]}" -v b="${M[$2.$3]}" -v f="$4" 'BEGIN{printf f, b - a}'
}
# sets CPU1, CPU2 (s), CHANNELS, STREAMS, OPEN_MS (mean), NOISY ("" or " [noisy]");
# returns 1 when other load was high
measured() { # markA markB
  local _gw other cap noisy
  read -r _gw other cap noisy < <("${PROCS[@]}" diff "$W/$1.json" "$W/$2.json")
  CPU1=$(delta "$1" "$2" r1 %.2f); CPU2=$(delta "$1" "$2" r2 %.2f)
  CHANNELS=$(delta "$1" "$2" chan %d); STREAMS=$(delta "$1" "$2" peer %d)
  OPEN_MS=$(per "$(delta "$1" "$2" open_s %.6f)" "$(delta "$1" "$2" open_n %d)" 1000)
  if [ "$noisy" = 1 ]; then
    NOISY=" [noisy]"; echo "    other processes used ${other} of ${cap} CPU-s: figure suspect"; return 1
  fi
  NOISY=""; return 0
}
per() { # amount count scale -> scale * amount / count, to about 3 significant digits
  awk -v a="$1" -v n="$2" -v s="$3" 'BEGIN{
    if (!(n ~ /^[0-9.]+$/ && n + 0 > 0)) { printf "?"; exit }
    v = s * a / n; printf (v >= 100 ? "%.0f" : v >= 0.1 ? "%.2f" : "%.2g"), v }'
}
ORDER_I=0
PAIR=""
pair() { # alternate which path goes first, workload by workload: sets PAIR
  ORDER_I=$((ORDER_I + 1))
  if [ $((ORDER_I % 2)) = 1 ]; then PAIR="direct hopped"; else PAIR="hopped direct"; fi
}
# table rows: label | kind (rate: higher is better, hopped/direct shown; lat: added ms shown) |
# direct | hopped | target ("ratio:X": hopped/direct >= X, "added:X": hopped - direct <= X ms, or "")
ROWS=()
row() { ROWS+=("$1|$2|$3|$4|${5:-}"); }
declare -A V   # V[path.metric]; a trailing * = noisy, ! = errors
MAXC=$(echo "$CONNS" | tr ' ' '\n' | sort -n | tail -1)
MINC=$(echo "$CONNS" | tr ' ' '\n' | sort -n | head -1)

# ------------------------------------------------------------------ bulk download
if step bulk; then
  hdr "bulk download: GET /big ($BIG_MB MiB), curl, best of $BULK_REPS; MB/s = 10^6 B/s"
  declare -A BEST=([direct]=0 [hopped]=0) BESTCPU BESTN
  for ((rep = 1; rep <= BULK_REPS; rep++)); do
    pair; for s in $PAIR; do
      for ((try = 0; try <= RETRIES; try++)); do
        wait_quiet
        mark b0
        res=$(curl -sk --max-time 300 --resolve "$(resolve "$s")" -o /dev/null \
          -w '%{http_code} %{size_download} %{time_total} %{speed_download}' "$(url "$s" /big)" || true)
        mark b1
        read -r code size secs bps <<<"$res"
        mbs=$(awk -v b="${bps:-0}" 'BEGIN{printf "%.0f", b/1e6}')
        ok=0; measured b0 b1 || ok=1
        gib=$(awk -v b="${size:-0}" 'BEGIN{print b / 1073741824}')
        cpg=$(per "$(awk -v a="$CPU1" -v b="$CPU2" 'BEGIN{print a + b}')" "$gib" 1)
        echo "  $s rep $rep: HTTP $code, $size B in ${secs}s = $mbs MB/s; CPU s/GiB r1+r2 $cpg" \
          "(r1 ${CPU1}s, r2 ${CPU2}s); SSH channels opened $CHANNELS, peer streams $STREAMS$NOISY"
        [ $ok = 0 ] && break
      done
      if [ "$code" = 200 ] && [ "$mbs" -gt "${BEST[$s]}" ]; then
        BEST[$s]=$mbs; BESTCPU[$s]=$cpg; BESTN[$s]=$NOISY
      fi
    done
  done
  for s in direct hopped; do
    V[$s.bulk]="${BEST[$s]}${BESTN[$s]:+*}"; V[$s.bulkcpu]="${BESTCPU[$s]:-?}${BESTN[$s]:+*}"
    [ "${BEST[$s]}" = 0 ] && V[$s.bulk]="failed"
  done
  row "bulk download $BIG_MB MiB, MB/s" rate "${V[direct.bulk]}" "${V[hopped.bulk]}" "ratio:$TARGET_BULK"
  row "  CPU s per GiB, r1+r2" cpu "${V[direct.bulkcpu]}" "${V[hopped.bulkcpu]}"
fi

# ------------------------------------------------------------------ wrk (HTTP/1.1)
if step wrk; then
  hdr "HTTP/1.1: wrk GET /hello (6-byte body), ${DUR}s per run, keep-alive"
  printf '  %-7s %5s %9s %8s %8s  %s\n' path conns req/s p50_ms p99_ms \
    "CPU us/req r1+r2 (r1, r2); per request: new SSH channels, new peer streams (mean open ms)"
  for c in $CONNS; do
    th=$(( c < 2 ? c : 2 ))
    pair; for s in $PAIR; do
      for ((try = 0; try <= RETRIES; try++)); do
        wait_quiet
        mark w0
        timeout $((DUR + 30)) wrk -t"$th" -c"$c" -d"${DUR}s" --latency -H "Host: $HOST" \
          "https://127.0.0.1:${PORT[${VIA[$s]}]}/hello" > "$W/wrk-$s-$c.txt" 2>&1 || true
        mark w1
        rps=$(awk '/^Requests\/sec:/{printf "%.0f", $2}' "$W/wrk-$s-$c.txt")
        p50=$(to_ms "$(awk '$1=="50%"{print $2}' "$W/wrk-$s-$c.txt")")
        p99=$(to_ms "$(awk '$1=="99%"{print $2}' "$W/wrk-$s-$c.txt")")
        nreq=$(awk '/requests in/{print $1; exit}' "$W/wrk-$s-$c.txt")
        notes=$(grep -E 'Non-2xx|Socket errors' "$W/wrk-$s-$c.txt" | tr -s ' ' | tr '\n' ' ' || true)
        ok=0; measured w0 w1 || ok=1
        us=$(per "$(awk -v a="$CPU1" -v b="$CPU2" 'BEGIN{print a + b}')" "${nreq:-0}" 1e6)
        cpr=$(per "$CHANNELS" "${nreq:-0}" 1); spr=$(per "$STREAMS" "${nreq:-0}" 1)
        printf '  %-7s %5s %9s %8s %8s  %s (%s, %s); %s, %s (%s); %s requests %s%s\n' "$s" "$c" \
          "${rps:-?}" "$p50" "$p99" "$us" "$(per "$CPU1" "${nreq:-0}" 1e6)" "$(per "$CPU2" "${nreq:-0}" 1e6)" \
          "$cpr" "$spr" "$OPEN_MS" "${nreq:-?}" "$notes" "$NOISY"
        [ $ok = 0 ] && break
      done
      n=${NOISY:+*}; [ -n "$notes" ] && n="$n!"
      V[$s.wrk$c]="${rps:-?}$n"; V[$s.wrk$c.p50]="$p50$n"; V[$s.wrk$c.p99]="$p99$n"
      V[$s.wrk$c.us]="$us$n"; V[$s.wrk$c.cpr]=$cpr; V[$s.wrk$c.spr]=$spr
    done
    target=""; [ "$c" = 64 ] && target="ratio:$TARGET_RPS"
    row "HTTP/1.1 wrk c=$c, req/s" rate "${V[direct.wrk$c]}" "${V[hopped.wrk$c]}" "$target"
    target=""; [ "$c" = "$MINC" ] && target="added:$TARGET_ADDED_P50_MS"
    row "HTTP/1.1 wrk c=$c, p50 ms" lat "${V[direct.wrk$c.p50]}" "${V[hopped.wrk$c.p50]}" "$target"
    row "HTTP/1.1 wrk c=$c, p99 ms" lat "${V[direct.wrk$c.p99]}" "${V[hopped.wrk$c.p99]}"
    row "  CPU us per request, r1+r2" cpu "${V[direct.wrk$c.us]}" "${V[hopped.wrk$c.us]}"
    row "  new SSH channels per request (r1)" info "${V[direct.wrk$c.cpr]}" "${V[hopped.wrk$c.cpr]}"
    row "  new peer streams per request (r2)" info "${V[direct.wrk$c.spr]}" "${V[hopped.wrk$c.spr]}"
  done
  echo "  command: wrk -t{1|2} -cC -d${DUR}s --latency -H 'Host: $HOST' https://127.0.0.1:PORT/hello"
fi

# ------------------------------------------------------------------ h2load (h2)
if step h2; then
  hdr "h2: h2load GET /hello, ${DUR}s per run, 1 stream per connection (-m 1)"
  printf '  %-7s %5s %9s %8s %8s  %s\n' path conns req/s p50_ms p99_ms "protocol; requests; per request: new SSH channels, new peer streams (mean open ms)"
  for c in $H2_CONNS; do
    th=$(( c < 2 ? c : 2 ))
    pair; for s in $PAIR; do
      port=${PORT[${VIA[$s]}]}
      for ((try = 0; try <= RETRIES; try++)); do
        wait_quiet
        rm -f "$W/h2load.log"
        mark h0
        timeout $((DUR + 30)) h2load -c"$c" -t"$th" -m1 -D"$DUR" --connect-to="127.0.0.1:$port" \
          --log-file="$W/h2load.log" "https://$HOST:$port/hello" > "$W/h2load-$s-$c.txt" 2>&1 || true
        mark h1
        rps=$(awk '/^finished in/{for(i=1;i<=NF;i++) if($(i+1) ~ /^req\/s/) printf "%.0f", $i}' "$W/h2load-$s-$c.txt")
        okreq=$(awk '/^requests:/{for(i=1;i<=NF;i++) if($(i+1) ~ /^succeeded/) print $i}' "$W/h2load-$s-$c.txt")
        failreq=$(awk '/^requests:/{for(i=1;i<=NF;i++) if($(i+1) ~ /^failed/) print $i}' "$W/h2load-$s-$c.txt")
        non2xx=$(awk '/^status codes:/{for(i=1;i<=NF;i++) if($(i+1) ~ /^[345]xx/) n += $i} END{print n+0}' "$W/h2load-$s-$c.txt")
        proto=$(grep -m1 -o 'Application protocol: [^ ]*' "$W/h2load-$s-$c.txt" | awk '{print $3}' || true)
        read -r p50 p99 < <("${PROCS[@]}" pct "$W/h2load.log" 3 0.001 50 99)
        ok=0; measured h0 h1 || ok=1
        printf '  %-7s %5s %9s %8s %8s  %s; %s ok, %s failed, %s non-2xx; %s, %s (%s)%s\n' "$s" "$c" \
          "${rps:-?}" "$p50" "$p99" "${proto:-?}" "${okreq:-?}" "${failreq:-?}" "$non2xx" \
          "$(per "$CHANNELS" "${okreq:-0}" 1)" "$(per "$STREAMS" "${okreq:-0}" 1)" "$OPEN_MS" "$NOISY"
        [ $ok = 0 ] && break
      done
      n=${NOISY:+*}; { [ "${failreq:-1}" != 0 ] || [ "$non2xx" != 0 ] || [ "${proto:-}" != h2 ]; } && n="$n!"
      V[$s.h2$c]="${rps:-?}$n"; V[$s.h2$c.p50]="$p50$n"; V[$s.h2$c.p99]="$p99$n"
    done
    row "h2 h2load c=$c, req/s" rate "${V[direct.h2$c]}" "${V[hopped.h2$c]}"
    row "h2 h2load c=$c, p50 ms" lat "${V[direct.h2$c.p50]}" "${V[hopped.h2$c.p50]}"
    row "h2 h2load c=$c, p99 ms" lat "${V[direct.h2$c.p99]}" "${V[hopped.h2$c.p99]}"
  done
  echo "  command: h2load -cC -t{1|2} -m1 -D$DUR --connect-to=127.0.0.1:PORT https://$HOST:PORT/hello"
fi

# ------------------------------------------------------------------ table
hdr "summary: direct (visitor on r1, the tunnel's replica) vs. hopped (visitor on r2, peer link to r1), same run"
ratio() { # direct hopped -> hopped/direct
  awk -v a="$1" -v b="$2" 'BEGIN{
    if (a ~ /^[0-9.]+/ && b ~ /^[0-9.]+/) { a += 0; b += 0; if (a > 0) printf "%.2f", b / a; else printf "-" }
    else printf "-" }'
}
added() { # direct hopped -> hopped - direct, ms
  awk -v a="$1" -v b="$2" 'BEGIN{
    if (a ~ /^[0-9.]+/ && b ~ /^[0-9.]+/) printf "%+.2f", (b + 0) - (a + 0); else printf "-" }'
}
verdict() { # target ("ratio:X" / "added:X" / "") ratio added -> met / MISSED / ?
  local kind=${1%%:*} x=${1#*:} v
  [ -n "$1" ] || return 0
  if [ "$kind" = ratio ]; then v=$2; else v=$3; fi
  awk -v v="$v" -v x="$x" -v k="$kind" 'BEGIN{
    if (v !~ /^[-+0-9.]+$/) { print "?"; exit }
    if ((k == "ratio" && v + 0 >= x + 0) || (k == "added" && v + 0 <= x + 0)) print "met"; else print "MISSED" }'
}
shown() { # target -> as printed
  case "$1" in ratio:*) echo ">= ${1#*:}" ;; added:*) echo "added <= ${1#*:}" ;; *) echo "" ;; esac
}
printf '%-40s | %10s | %10s | %8s | %8s | %-15s | %s\n' workload direct hopped hop/dir "added ms" target ""
printf '%s\n' "$(printf '%.0s-' {1..112})"
for r in "${ROWS[@]}"; do
  IFS='|' read -r label kind a b target <<<"$r"
  q=$(ratio "$a" "$b"); d="-"
  [ "$kind" = lat ] && d=$(added "$a" "$b")
  [ "$kind" = info ] && q="-"
  printf '%-40s | %10s | %10s | %8s | %8s | %-15s | %s\n' "$label" "$a" "$b" "$q" "$d" \
    "$(shown "$target")" "$(verdict "$target" "$q" "$d")"
done
echo
echo "hop/dir = hopped / direct (for req/s and MB/s, 1.00 = the hop costs nothing; for CPU, what the"
echo "hop costs in CPU); added ms = hopped - direct latency."
echo "Targets (SCALEOUT §4.4): bulk ≥ $TARGET_BULK, req/s at c=64 ≥ $TARGET_RPS, added p50 ≤ $TARGET_ADDED_P50_MS ms (judged at c=$MINC)."
echo "*  = other processes used >10% of the machine during that measurement (after $RETRIES retry): suspect."
echo "!  = the load generator reported errors (non-2xx, socket errors, failed requests): see the log above."
echo "Everything runs on one machine ($(nproc) cores): r1, r2, etcd, nginx, the tunnel client and the"
echo "load generator share its CPU, so a hop's extra CPU shows up as lower req/s when the CPU is the limit."
