"""A gRPC server and client for tests/grpc.rs, on grpcio with raw bytes (no generated code).

  echo.py serve PORT          an insecure (h2c) server on 127.0.0.1:PORT; prints "listening"
  echo.py call TARGET HOST CA calls the server through the gateway at TARGET (TLS, CA file,
                              HOST as the authority and SNI); prints one JSON line of results
"""
import json
import sys
import threading
import time
from concurrent import futures

import grpc

SERVICE = "edgemux.test.Echo"


def unary(request, context):
    if request == b"fail":
        context.set_trailing_metadata((("x-why", "asked to fail"),))
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    context.set_trailing_metadata((("x-echo-length", str(len(request))),))
    return request[::-1]


def stream(request, context):
    count = int(request.decode())
    for i in range(count):
        yield f"message {i}".encode()
    context.set_trailing_metadata((("x-sent", str(count)),))


def slow(request, context):
    time.sleep(3)
    return b"too late"


def serve(port):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("listening", flush=True)
    server.wait_for_termination()


def call(target, host, ca):
    with open(ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    options = (("grpc.ssl_target_name_override", host), ("grpc.default_authority", host))
    out = {}
    with grpc.secure_channel(target, creds, options=options) as channel:
        method = lambda name, kind: getattr(channel, kind)(f"/{SERVICE}/{name}")
        echo = method("Unary", "unary_unary")
        reply, call = echo.with_call(b"hello", timeout=10)
        out["unary"] = reply.decode()
        out["unary_code"] = call.code().name
        out["unary_trailers"] = dict(call.trailing_metadata())
        try:
            echo(b"fail", timeout=10)
            out["fail_code"] = "OK"
        except grpc.RpcError as e:
            out["fail_code"] = e.code().name
            out["fail_details"] = e.details()
            out["fail_trailers"] = dict(e.trailing_metadata())
        replies = method("Stream", "unary_stream")(b"5", timeout=10)
        out["stream"] = [m.decode() for m in replies]
        out["stream_code"] = replies.code().name
        out["stream_trailers"] = dict(replies.trailing_metadata())
        # 120 calls that miss their deadline: each gives its stream's place back.
        missed = 0
        for _ in range(120):
            try:
                method("Slow", "unary_unary")(b"x", timeout=0.03)
            except grpc.RpcError as e:
                missed += e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        out["missed_deadlines"] = missed
        # 200 at once on this one channel (one connection to the gateway).
        pending = [echo.future(f"call {i}".encode(), timeout=20) for i in range(200)]
        good = 0
        for i, f in enumerate(pending):
            try:
                good += f.result() == f"call {i}".encode()[::-1]
            except grpc.RpcError as e:
                out.setdefault("concurrent_errors", []).append(e.code().name)
        out["concurrent_ok"] = good
        started = time.monotonic()
        try:
            method("Slow", "unary_unary")(b"x", timeout=0.5)
            out["deadline_code"] = "OK"
        except grpc.RpcError as e:
            out["deadline_code"] = e.code().name
        out["deadline_secs"] = time.monotonic() - started
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        call(sys.argv[2], sys.argv[3], sys.argv[4])
