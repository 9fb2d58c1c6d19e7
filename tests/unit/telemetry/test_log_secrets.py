"""At ``--log-level DEBUG`` no header block reaches the log.

hpack (under ``h2``: the CA client's gRPC, HBONE, the HTTP/2 layer) logs every header block it
encodes or decodes at DEBUG, Huffman-coded at most: the CA client's ``authorization: Bearer``
token (hpack redacts the value in one line and prints the whole encoded block in the next,
which decodes back to it), and the ``authorization`` or ``cookie`` of every proxied HTTP/2
request. The agent's logging setup (``loglevel.configure``, what ``nodemesh`` and each worker
run) holds hpack at INFO whatever the level."""

from __future__ import annotations

import logging

from hpack import Decoder, Encoder

from agent.telemetry.loglevel import configure, set_level

TOKEN = "s3cret-node-token-0123456789"


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.getMessage()}")


def _logged_at_debug(how: str) -> list[str]:
    """What reaches the root's handlers when the agent logs at DEBUG (``how``: from the start,
    or raised at run time through the admin API), while hpack encodes and decodes a block."""
    root, hpack_logger = logging.getLogger(), logging.getLogger("hpack")
    saved = (root.handlers[:], root.level, hpack_logger.level)
    root.handlers.clear()  # basicConfig configures only a root without handlers
    kept = Kept()
    try:
        configure("DEBUG" if how == "start" else "INFO")
        if how == "runtime":
            set_level("debug")
        root.addHandler(kept)
        block = Encoder().encode([("authorization", f"Bearer {TOKEN}"), ("cookie", "sid=abc")])
        Decoder().decode(block)
        logging.getLogger("agent.identity.caclient").debug("our own debug line")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        hpack_logger.setLevel(saved[2])
    return kept.lines


def test_at_debug_the_bearer_token_and_request_headers_stay_out_of_the_log() -> None:
    for how in ("start", "runtime"):
        lines = _logged_at_debug(how)
        assert "agent.identity.caclient our own debug line" in lines  # DEBUG is on
        assert [line for line in lines if line.startswith("hpack")] == []


def test_at_debug_the_cas_root_key_read_from_its_secret_stays_out_of_the_log() -> None:
    """The official client logs every response body at DEBUG (``kubernetes.client.rest``):
    the CA's root Secret, key included, and every pod spec the agent lists (env values too)."""
    import base64

    from kubernetes import client

    from agent.ca.kube import load_or_create_secret
    from tests.fakeapi import FakeApiServer

    root, kube_logger = logging.getLogger(), logging.getLogger("kubernetes.client.rest")
    saved = (root.handlers[:], root.level, kube_logger.level)
    root.handlers.clear()
    kept = Kept()
    try:
        configure("DEBUG")
        root.addHandler(kept)
        with FakeApiServer() as api:
            api.create("Namespace", {"metadata": {"name": "nodemesh-system"}})
            core = client.CoreV1Api(client.ApiClient(client.Configuration(host=api.url)))
            load_or_create_secret(core, "nodemesh-system", "nodemesh-ca", "cluster.local")
            load_or_create_secret(core, "nodemesh-system", "nodemesh-ca", "cluster.local")
            (secret,) = api.list_objects("Secret", "nodemesh-system")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        kube_logger.setLevel(saved[2])
    key_b64 = secret["data"]["ca-key.pem"]
    assert b"PRIVATE KEY" in base64.b64decode(key_b64)
    logged = "\n".join(kept.lines)
    assert key_b64[:40] not in logged and "PRIVATE KEY" not in logged
