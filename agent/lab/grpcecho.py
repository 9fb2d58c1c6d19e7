"""The lab's gRPC service: a small grpcio server for the pods behind Service ``grpc``.

``python -m agent.lab.grpcecho serve --name server-0`` in a pod serves
``nodemesh.lab.Echo`` with three methods, enough to show per-call telemetry and L7 policy:

* ``Unary``: answers ``<name>:<request>``, so a client sees which replica served it; a request
  starting with ``fail:`` is answered with status NOT_FOUND on purpose (an error status the
  metrics must report as such), one ``sleep:<seconds>`` is answered after that long (a call
  still in flight when something breaks), and ``unavailable:<name>`` with status UNAVAILABLE
  by replica ``<name>`` only (a replica failing, for retries);
* ``Stream`` (server-streaming): the request is a count *n*, the answers ``<name>:0`` ..
  ``<name>:<n-1>``;
* ``Admin``: like ``Unary``, a method of its own for a DENY on a method path.

``python -m agent.lab.grpcecho call HOST:PORT METHOD=REQUEST ... [--header NAME=VALUE]
[--timed]`` makes calls on one channel, each with that metadata, and prints their outcomes (and
seconds) as JSON (the lab tests, the demo and the bench run it in a pod).

Why generic handlers with raw bytes, and no ``.proto``: the mesh sees gRPC framing, paths,
headers and trailers, never the message contents, so a protobuf schema would add a protoc step
(or generated code to keep in sync) and test nothing more. Messages are the bytes themselves
(identity (de)serializers); the gRPC wire format is the real one.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator, Sequence
from concurrent import futures

import grpc

SERVICE = "nodemesh.lab.Echo"
UNARY = f"/{SERVICE}/Unary"
STREAM = f"/{SERVICE}/Stream"
ADMIN = f"/{SERVICE}/Admin"
PORT = 50051
FAIL_PREFIX = b"fail:"
SLEEP_PREFIX = b"sleep:"
UNAVAILABLE_PREFIX = b"unavailable:"
CALL_TIMEOUT = 10.0  # seconds, per call of ``calls``


def _identity(data: bytes) -> bytes:
    return data


def handler(name: str) -> grpc.GenericRpcHandler:
    """The ``Echo`` service of replica ``name``."""
    tag = name.encode()

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        if request.startswith(FAIL_PREFIX):
            context.abort(grpc.StatusCode.NOT_FOUND, "asked to fail")
        if request == UNAVAILABLE_PREFIX + tag:
            context.abort(grpc.StatusCode.UNAVAILABLE, "asked to be unavailable")
        if request.startswith(SLEEP_PREFIX):
            time.sleep(float(request[len(SLEEP_PREFIX) :]))
        return tag + b":" + request

    def stream(request: bytes, _context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(request or b"0")):
            yield tag + b":" + str(i).encode()

    def unary_method(fn: object) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=_identity, response_serializer=_identity
        )

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": unary_method(unary),
            "Admin": unary_method(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=_identity, response_serializer=_identity
            ),
        },
    )


def serve(
    port: int, name: str, *, workers: int = 8, host: str = "0.0.0.0"
) -> tuple[grpc.Server, int]:
    """A started server on ``host`` (all addresses by default), plaintext (h2c: the mesh
    provides mTLS), and the port it bound: pass port 0 to let the kernel pick one, so that no
    other process can take a port picked earlier before the server binds it."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers((handler(name),))
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    return server, bound


def unary_call(channel: grpc.Channel, method: str = UNARY) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(
        method, request_serializer=_identity, response_deserializer=_identity
    )


def stream_call(channel: grpc.Channel) -> grpc.UnaryStreamMultiCallable:
    return channel.unary_stream(
        STREAM, request_serializer=_identity, response_deserializer=_identity
    )


def calls(
    target: str,
    wanted: Sequence[tuple[str, bytes]],
    metadata: Sequence[tuple[str, str]] = (),
    *,
    timed: bool = False,
) -> list[tuple[str, ...]]:
    """Make ``wanted`` calls (method path, request) in order on ONE channel to ``target``, each
    with ``metadata``; per call its status name and the answer (streamed answers joined by
    ``,``) or the error's details, and if ``timed`` its seconds (as text)."""
    out: list[tuple[str, ...]] = []
    with grpc.insecure_channel(target) as channel:
        for method, request in wanted:
            started = time.monotonic()
            try:
                if method == STREAM:
                    answers = stream_call(channel)(request, timeout=CALL_TIMEOUT, metadata=metadata)
                    result = ("OK", ",".join(a.decode() for a in answers))
                else:
                    answer = unary_call(channel, method)(
                        request, timeout=CALL_TIMEOUT, metadata=metadata
                    )
                    result = ("OK", answer.decode())
            except grpc.RpcError as e:
                result = (e.code().name, e.details() or "")
            took = (f"{time.monotonic() - started:.3f}",) if timed else ()
            out.append(result + took)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the lab's gRPC echo service and its client")
    sub = parser.add_subparsers(dest="command", required=True)
    server = sub.add_parser("serve", help="serve nodemesh.lab.Echo until killed")
    server.add_argument("--port", type=int, default=PORT)
    server.add_argument("--name", required=True, help="replica name, echoed in every answer")
    client = sub.add_parser("call", help="calls on one channel; prints one JSON list")
    client.add_argument("target", help="host:port")
    client.add_argument(
        "calls", nargs="+", metavar="METHOD=REQUEST", help=f"e.g. {UNARY}=hello {STREAM}=3"
    )
    client.add_argument(
        "--header", action="append", default=[], metavar="NAME=VALUE", help="metadata per call"
    )
    client.add_argument("--timed", action="store_true", help="add each call's seconds")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.port, args.name)[0].wait_for_termination()
        return
    wanted = [(m, r.encode()) for m, _, r in (c.partition("=") for c in args.calls)]
    metadata = [(n.lower(), v) for n, _, v in (h.partition("=") for h in args.header)]
    print(json.dumps(calls(args.target, wanted, metadata, timed=args.timed)))


if __name__ == "__main__":
    main()
