"""A single-process agent: when the identity manager drops an identity (no meshed pod of this
node uses it any more), the proxy's TLS contexts presenting it go too, so its private key does
not stay loaded in OpenSSL for the agent's life (workers do the same in ``agent.workers.certs``)."""

from __future__ import annotations

import argparse
import ssl

from agent.app import mesh_components
from agent.config import add_arguments, from_args
from agent.state import StateStore


def test_a_dropped_identity_takes_its_contexts_along() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            *("--node", "node1", "--cluster-file", "cluster.yaml"),
            *("--ca-address", "10.0.0.1:15012", "--ca-root", "root.pem", "--token-file", "token"),
            *("--workers", "1"),  # the proxy in this process (the default is one per CPU)
        ]
    )
    identity, proxy = mesh_components(from_args(args), StateStore())
    assert identity is not None and proxy is not None
    contexts = proxy.proxy.core.contexts
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    gone, kept = "spiffe://cluster.local/ns/a/sa/gone", "spiffe://cluster.local/ns/a/sa/kept"
    contexts._cache[(gone, None, True)] = (object(), ctx)  # type: ignore[assignment]
    contexts._cache[(kept, None, True)] = (object(), ctx)  # type: ignore[assignment]
    for observer in identity.manager.observers:
        observer(gone, None)
    assert [k[0] for k in contexts._cache] == [kept]
