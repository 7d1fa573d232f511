#!/usr/bin/env python3
"""/proc accounting for bench/run.sh (reads /proc only, never signals anything).

A "tree" is a process plus all its live descendants. CPU of a tree counts utime+stime and the
cutime+cstime of children it already reaped (short-lived sslh-fork children, sshd privsep ones).

  procs.py snap OUT --gw PID,.. --ours PID,..   CPU snapshot (JSON). gw: the gateway trees whose
                                                CPU is reported; ours: every tree that belongs to
                                                the benchmark (run.sh, the chain's daemons, the
                                                backend, tunnel clients). Everything else that is
                                                not a kernel thread is "other load on the machine".
  procs.py diff A B                             prints: gw_cpu_s other_cpu_s capacity_cpu_s noisy
                                                (noisy=1 when other load took > NOISE_FRAC, 0.10, of
                                                the machine)
  procs.py mem PID,..                           prints: rss_kib pss_kib processes threads
  procs.py mem-detail LABEL=PID,.. ...          one line per group, for the log
  procs.py pct FILE COL SCALE P [P ...]         percentiles of a whitespace-separated column
                                                (1-based), values multiplied by SCALE
  procs.py tasks                                number of tasks (threads) on the machine
"""
import json
import os
import sys
import time

CLK = os.sysconf("SC_CLK_TCK")
NOISE_FRAC = float(os.environ.get("NOISE_FRAC", "0.10"))


def read_stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(")") + 2:].split()
    return {
        "ppid": int(rest[1]),
        "cpu": int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14]),
    }


def all_procs():
    procs = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = read_stat(int(d))
            if st:
                procs[int(d)] = st
    return procs


def trees(roots, procs):
    kids = {}
    for pid, st in procs.items():
        kids.setdefault(st["ppid"], []).append(pid)
    out, todo = set(), [r for r in roots if r in procs]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo.extend(kids.get(p, []))
    return out


def pids_arg(s):
    return [int(x) for x in s.split(",") if x.strip().isdigit()]


def system_busy():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v) - v[3] - v[4], sum(v)


def snap(out, gw, ours):
    procs = all_procs()
    g = trees(gw, procs)
    o = trees(ours, procs) | g
    other = 0
    for pid, st in procs.items():
        if pid in o or pid == 2 or st["ppid"] == 2:
            continue
        other += st["cpu"]
    busy, total = system_busy()
    with open(out, "w") as f:
        json.dump({"t": time.time(), "gw": sum(procs[p]["cpu"] for p in g), "other": other,
                   "busy": busy, "total": total}, f)


def diff(a_path, b_path):
    with open(a_path) as f:
        a = json.load(f)
    with open(b_path) as f:
        b = json.load(f)
    cap = (b["t"] - a["t"]) * (os.cpu_count() or 1)
    gw = max(0, b["gw"] - a["gw"]) / CLK
    # other processes' totals include reaped children: compare sums, floor at 0
    other = max(0, b["other"] - a["other"]) / CLK
    noisy = 1 if other > NOISE_FRAC * cap else 0
    print(f"{gw:.3f} {other:.3f} {cap:.3f} {noisy}")


def kib(pid, path, key):
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def nthreads(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def mem_of(roots, procs):
    ps = trees(roots, procs)
    rss = sum(kib(p, "status", "VmRSS:") for p in ps)
    pss = sum(kib(p, "smaps_rollup", "Pss:") for p in ps)
    return rss, pss, len(ps), sum(nthreads(p) for p in ps)


def percentiles(path, col, scale, ps):
    vals = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= col:
                try:
                    vals.append(float(parts[col - 1]) * scale)
                except ValueError:
                    pass
    if not vals:
        print(" ".join("?" for _ in ps))
        return
    vals.sort()
    out = []
    for p in ps:
        i = min(len(vals) - 1, max(0, int(round(p / 100.0 * len(vals) + 0.5)) - 1))
        out.append(f"{vals[i]:.3f}")
    print(" ".join(out))


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd = sys.argv[1]
    if cmd == "snap":
        args = dict(zip(sys.argv[3::2], sys.argv[4::2]))
        snap(sys.argv[2], pids_arg(args.get("--gw", "")), pids_arg(args.get("--ours", "")))
    elif cmd == "diff":
        diff(sys.argv[2], sys.argv[3])
    elif cmd == "mem":
        print(*mem_of(pids_arg(sys.argv[2]), all_procs()))
    elif cmd == "mem-detail":
        procs = all_procs()
        for spec in sys.argv[2:]:
            label, _, pids = spec.partition("=")
            rss, pss, n, t = mem_of(pids_arg(pids), procs)
            print(f"    {label:<22} {n:>6} procs {t:>6} threads  RSS {rss / 1024:9.1f} MiB"
                  f"  PSS {pss / 1024:9.1f} MiB")
    elif cmd == "pct":
        percentiles(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]),
                    [float(p) for p in sys.argv[5:]])
    elif cmd == "tasks":
        n = 0
        for d in os.listdir("/proc"):
            if d.isdigit():
                n += nthreads(d)
        print(n)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
