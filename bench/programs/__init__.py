"""The small client and server programs the harness runs inside the lab's pods.

Each is a standalone script (``python -m bench.programs.<name> --help``) that prints one JSON
document on stdout, so the harness reads results the same way from every path. They are plain
sockets, with uvloop where many connections are in flight, and set ``TCP_NODELAY`` so that
request/response latency measures the path, not Nagle's algorithm.
"""

import resource


def raise_nofile() -> int:
    """Lift the soft open-files limit to the hard one (idle tests hold 10,000+ sockets)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
