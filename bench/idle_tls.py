#!/usr/bin/env python3
"""Open N idle HTTPS keep-alive connections for bench/run.sh and hold them.

Each connection does a full TLS handshake (no resumption; SNI HOST, ALPN http/1.1), sends one
`GET /hello` with keep-alive and reads the response, then stays open and silent: what an idle
browser tab or a polling client leaves behind. (A TLS connection that never sends a request is not
idle on either side: sslh and edgemux both treat a silent client as SSH after 2 s.)

Opens at most --concurrency at a time, gives up on a connection after --timeout s and stops
opening once --max-failures failed. Writes "held=H failed=F attempted=A secs=S" to --ready, then
holds until SIGTERM/SIGINT (or --hold-max s), then writes "still_open=K" to --ready.end and closes
everything.

  idle_tls.py --port P --host H --count N --ready FILE
"""
import argparse
import asyncio
import os
import resource
import signal
import ssl
import time


class Conn(asyncio.Protocol):
    def __init__(self, req, done, stats):
        self.req, self.done, self.stats = req, done, stats
        self.buf = b""
        self.transport = None
        self.ok = False

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.req)

    def data_received(self, data):
        if self.done.done():
            return
        self.buf += data
        head, sep, body = self.buf.partition(b"\r\n\r\n")
        if not sep:
            return
        want = None
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                want = int(v.strip())
        if want is not None and len(body) < want:
            return
        if want is None and b"chunked" in head.lower() and not body.endswith(b"0\r\n\r\n"):
            return
        self.ok = head.startswith(b"HTTP/1.1 200")
        self.buf = b""
        self.done.set_result(self.ok)

    def connection_lost(self, exc):
        if self.ok:
            self.stats["open"] -= 1
        if not self.done.done():
            self.done.set_result(False)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--ready", required=True)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=10)
    ap.add_argument("--max-failures", type=int, default=200)
    ap.add_argument("--deadline", type=float, default=300, help="seconds to open them all")
    ap.add_argument("--hold-max", type=float, default=600)
    a = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    count = min(a.count, hard - 100)

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    req = f"GET /hello HTTP/1.1\r\nHost: {a.host}\r\nUser-Agent: idle_tls\r\n\r\n".encode()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)

    stats = {"open": 0, "failed": 0, "attempted": 0}
    transports = []
    sem = asyncio.Semaphore(a.concurrency)
    t0 = time.time()

    async def one():
        async with sem:
            if stats["failed"] >= a.max_failures or stop.is_set() or time.time() - t0 > a.deadline:
                return
            stats["attempted"] += 1
            done = loop.create_future()
            transport = None
            try:
                transport, _ = await asyncio.wait_for(
                    loop.create_connection(lambda: Conn(req, done, stats), "127.0.0.1", a.port,
                                           ssl=ctx, server_hostname=a.host),
                    a.timeout)
                ok = await asyncio.wait_for(done, a.timeout)
            except (OSError, asyncio.TimeoutError, ssl.SSLError):
                ok = False
            if ok:
                stats["open"] += 1
                transports.append(transport)
            else:
                stats["failed"] += 1
                if transport is not None:
                    transport.abort()

    await asyncio.gather(*(one() for _ in range(count)))
    held = stats["open"]
    with open(a.ready + ".tmp", "w") as f:
        f.write(f"held={held} failed={stats['failed']} attempted={stats['attempted']} "
                f"secs={time.time() - t0:.1f}\n")
    os.replace(a.ready + ".tmp", a.ready)
    try:
        await asyncio.wait_for(stop.wait(), a.hold_max)
    except asyncio.TimeoutError:
        pass
    with open(a.ready + ".end", "w") as f:
        f.write(f"still_open={stats['open']}\n")
    for t in transports:
        t.abort()
    await asyncio.sleep(0.5)


if __name__ == "__main__":
    asyncio.run(main())
