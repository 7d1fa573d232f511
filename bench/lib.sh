# Routines shared by bench/run.sh and bench/cluster.sh (sourced, not run): stopping what a
# benchmark started, checking ports, waiting for a quiet machine, reading wrk's latencies.
# Safe under `set -e`: none of them fails because a process has already gone.
# wait_quiet reads QUIET_PCT and QUIET_WAIT (set by the caller).

hdr() { echo; echo "=== $* ==="; }
listening() { ss -Hltn "sport = :$1" | grep -q .; }

stop_pid() { # pid [group] : TERM, wait up to 10 s, KILL
  local pid=$1 i
  [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 0
  if [ "${2:-}" = group ]; then kill -TERM -- "-$pid" 2>/dev/null || true; else kill -TERM "$pid" 2>/dev/null || true; fi
  for ((i = 0; i < 100; i++)); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
  if [ -d "/proc/$pid" ]; then
    if [ "${2:-}" = group ]; then kill -KILL -- "-$pid" 2>/dev/null || true; else kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  wait "$pid" 2>/dev/null || true
}

busy_pct() { # share of the machine busy during one second, %
  local a b busy=0 tot=0 i d
  read -ra a < <(head -1 /proc/stat); sleep 1; read -ra b < <(head -1 /proc/stat)
  for i in 1 2 3 4 5 6 7 8; do
    d=$(( b[i] - a[i] )); tot=$(( tot + d ))
    [ "$i" != 4 ] && [ "$i" != 5 ] && busy=$(( busy + d ))
  done
  echo $(( tot > 0 ? 100 * busy / tot : 0 ))
}
wait_quiet() { # other load on a 2-core box distorts everything: wait it out (bounded)
  local t0=$SECONDS p
  while :; do
    p=$(busy_pct)
    [ "$p" -le "$QUIET_PCT" ] && return 0
    if [ $((SECONDS - t0)) -ge "$QUIET_WAIT" ]; then
      echo "    (machine still ${p}% busy after ${QUIET_WAIT}s; measuring anyway)"; return 0
    fi
  done
}

to_ms() { # wrk latency "812.00us" / "1.20ms" / "1.01s" -> ms
  awk -v v="$1" 'BEGIN{ if (v ~ /us$/) {sub(/us$/,"",v); printf "%.3f", v/1000}
    else if (v ~ /ms$/) {sub(/ms$/,"",v); printf "%.2f", v}
    else if (v ~ /s$/) {sub(/s$/,"",v); printf "%.1f", v*1000} else printf "?" }'
}

build_edgemux() { # sets BIN: $EDGEMUX_BIN as given, else a release build of $REPO
  if [ -n "${EDGEMUX_BIN:-}" ]; then
    BIN=$EDGEMUX_BIN   # a binary built elsewhere: no build
  else
    hdr "build: cargo build --release --locked"
    (cd "$REPO" && cargo build --release --locked 2>&1 | tail -3) || die "build failed"
    BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/edgemux
  fi
  [ -x "$BIN" ] || die "no binary at $BIN"
}
