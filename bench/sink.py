#!/usr/bin/env python3
"""Upload sink for bench/run.sh: an HTTP/1.1 origin that reads the whole request body
(Content-Length or chunked), then answers 200 with the byte count. Keep-alive, one thread per
connection, 127.0.0.1 only.

  sink.py PORT
"""
import socket
import sys
import threading

BUF = 1 << 20


def read_line(conn, pending):
    while b"\r\n" not in pending:
        chunk = conn.recv(65536)
        if not chunk:
            return None, pending
        pending += chunk
    line, _, rest = pending.partition(b"\r\n")
    return line, rest


def drain(conn, pending, n, buf):
    """Consume n body bytes, first from pending. Returns the leftover pending bytes."""
    take = min(n, len(pending))
    n -= take
    pending = pending[take:]
    view = memoryview(buf)
    while n > 0:
        got = conn.recv_into(view, min(n, len(buf)))
        if got == 0:
            raise ConnectionError("peer closed mid-body")
        n -= got
    return pending


def serve(conn):
    buf = bytearray(BUF)
    pending = b""
    try:
        while True:
            while b"\r\n\r\n" not in pending:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                pending += chunk
                if len(pending) > 65536:
                    return
            head, _, pending = pending.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            headers = {}
            for h in lines[1:]:
                k, _, v = h.partition(b":")
                headers[k.strip().lower()] = v.strip()
            total = 0
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                while True:
                    line, pending = read_line(conn, pending)
                    if line is None:
                        return
                    size = int(line.split(b";")[0], 16)
                    if size == 0:
                        # trailers until an empty line
                        while True:
                            line, pending = read_line(conn, pending)
                            if not line:
                                break
                        break
                    pending = drain(conn, pending, size + 2, buf)
                    total += size
            else:
                n = int(headers.get(b"content-length", b"0"))
                pending = drain(conn, pending, n, buf)
                total = n
            body = f"{total}\n".encode()
            close = headers.get(b"connection", b"").lower() == b"close"
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                         + str(len(body)).encode() + (b"\r\nConnection: close" if close else b"")
                         + b"\r\n\r\n" + body)
            if close:
                return
    except (OSError, ValueError, ConnectionError):
        return
    finally:
        conn.close()


def main():
    port = int(sys.argv[1])
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(256)
    print(f"sink listening 127.0.0.1:{port}", flush=True)
    while True:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
