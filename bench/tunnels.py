#!/usr/bin/env python3
"""Open N idle `ssh -R` tunnels (real OpenSSH clients, each through an `openssl s_client`
ProxyCommand, like the main tunnel) for bench/run.sh, hold them, close them on SIGTERM.

Each client runs in its own session (process group), so stopping one kills its ProxyCommand too.
Launches at most --concurrency logins at a time (sshd's MaxStartups 10:30:100 drops unauthenticated
connections beyond 10) and stops launching when memory or process ids run low. Writes
"up=U failed=F launched=L note=..." to --ready when every launched client has succeeded or failed,
then holds until SIGTERM/SIGINT or --hold-max seconds, then stops every client it started.

  tunnels.py --kind chain|edgemux --count N --port P --key KEY --user USER --logdir DIR
             --ready FILE [--known-hosts F] [--target 127.0.0.1:8000] [--concurrency 8]
"""
import argparse
import os
import signal
import subprocess
import sys
import time

STOP = False


def on_signal(_sig, _frame):
    global STOP
    STOP = True


def mem_available_mib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def tasks_total():
    with open("/proc/loadavg") as f:
        return int(f.read().split()[3].split("/")[1])


def pid_max():
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read())


def command(a, i, log):
    cmd = ["ssh", "-n", "-N", "-F", "/dev/null", "-v", "-E", log, "-i", a.key,
           "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
           "-o", "ServerAliveInterval=30",
           "-o", f"ProxyCommand=openssl s_client -quiet -connect 127.0.0.1:{a.port} -servername gw.test"]
    if a.kind == "chain":
        cmd += ["-o", "HostKeyAlias=gw.test", "-o", f"UserKnownHostsFile={a.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-R", f"127.0.0.1:0:{a.target}"]
    else:
        cmd += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-R", f"t{i}:80:{a.target}"]
    return cmd + ["-l", a.user, "gw.test"]


def state(proc, log):
    if proc.poll() is not None:
        return "failed"
    try:
        with open(log, "rb") as f:
            data = f.read()
    except OSError:
        return "pending"
    if b"remote forward success" in data:
        return "up"
    if b"remote forward failure" in data or b"Permission denied" in data:
        return "failed"
    return "pending"


def stop_all(procs):
    # the whole group: a ProxyCommand may outlive its ssh (s_client -quiet ignores stdin EOF)
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=["chain", "edgemux"], required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--logdir", required=True)
    ap.add_argument("--ready", required=True)
    ap.add_argument("--known-hosts", default="/dev/null")
    ap.add_argument("--target", default="127.0.0.1:8000")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--login-timeout", type=float, default=30)
    ap.add_argument("--min-avail-mib", type=int, default=2048)
    ap.add_argument("--hold-max", type=float, default=900)
    ap.add_argument("--deadline", type=float, default=600, help="seconds to open them all")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    os.makedirs(a.logdir, exist_ok=True)

    procs, pending = [], {}
    up = failed = 0
    note = "ok"
    t0 = time.time()
    i = 0
    task_cap = pid_max() - 6000
    try:
        while not STOP and (i < a.count or pending):
            if time.time() - t0 > a.deadline:
                note = f"deadline_{int(a.deadline)}s"
                break
            while i < a.count and len(pending) < a.concurrency and note == "ok":
                if mem_available_mib() < a.min_avail_mib:
                    note = f"stopped_at_{i}_low_memory"
                    break
                if tasks_total() > task_cap:
                    note = f"stopped_at_{i}_pid_budget"
                    break
                log = os.path.join(a.logdir, f"t{i}.log")
                p = subprocess.Popen(command(a, i, log), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
                procs.append(p)
                pending[p] = (log, time.time())
                i += 1
            if note != "ok" and not pending:
                break
            time.sleep(0.02)
            for p, (log, started) in list(pending.items()):
                s = state(p, log)
                if s == "pending" and time.time() - started > a.login_timeout:
                    s = "failed"
                if s == "up":
                    up += 1
                    del pending[p]
                elif s == "failed":
                    failed += 1
                    del pending[p]
                    try:
                        os.killpg(p.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            if failed > max(10, a.count // 10):
                note = f"too_many_failures_at_{i}"
                break
        # clients still running count as up only if they made it
        alive = sum(1 for p in procs if p.poll() is None)
        with open(a.ready + ".tmp", "w") as f:
            f.write(f"up={up} failed={failed} launched={i} alive={alive} "
                    f"secs={time.time() - t0:.1f} note={note}\n")
        os.replace(a.ready + ".tmp", a.ready)
        hold_until = time.time() + a.hold_max
        while not STOP and time.time() < hold_until:
            time.sleep(0.2)
    finally:
        stop_all(procs)


if __name__ == "__main__":
    sys.exit(main())
