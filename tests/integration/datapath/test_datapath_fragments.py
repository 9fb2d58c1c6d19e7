"""A SYN cut into IP fragments is no way past the capture (RFC 1858's tiny-fragment attack).

tc sees a packet before the kernel reassembles it. A first fragment that carries only the
first 8 bytes of the TCP header (ports and sequence number) has no flags to read, so before the
programs passed it untouched as "not a segment they could parse", and the destination pod
reassembled a SYN that no listener ever saw: a meshed pod's connection past the proxy, its
mTLS and its policy. TCP never needs fragments (Linux sets DF on TCP and sizes segments to the
path), so a TCP fragment to or from a meshed pod is dropped (counter ``fragment``).

A pod with ``CAP_NET_RAW`` (the default of most container runtimes) sends the packets with a
raw socket; a sniffer in the destination pod reports which of them arrived."""

from __future__ import annotations

import subprocess

import pytest

from agent.lab.handle import Lab
from tests.integration.datapath.harness import NodeDatapath
from tests.integration.datapath.harness import pod_ip as ip

pytestmark = [pytest.mark.root, pytest.mark.lab]

# argv: destination ip, then "port:ip-id:frag|whole" per packet, sent in that order.
SEND = r"""
import socket, struct, sys

def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF

raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
dst = sys.argv[1]
src = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
src.connect((dst, 9))
src_ip = src.getsockname()[0]
for spec in sys.argv[2:]:
    port, ident, how = spec.split(":")
    port, ident = int(port), int(ident)
    sport = 40000 + ident % 1000
    tcp = struct.pack("!HHIIBBHHH", sport, port, 0x1000, 0, 5 << 4, 0x02, 65535, 0, 0)
    pseudo = socket.inet_aton(src_ip) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
    pieces = [(0, tcp[:8], 0x2000), (1, tcp[8:], 0)] if how == "frag" else [(0, tcp, 0)]
    for offset, body, more in pieces:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), ident, more | offset, 64, 6, 0,
                         socket.inet_aton(src_ip), socket.inet_aton(dst))
        raw.sendto(ip + body, (dst, 0))
"""

# argv: source ip, the ip-id that ends the watch; prints every watched id that arrived.
SNIFF = r"""
import socket, struct, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.settimeout(0.5)
src, last = socket.inet_aton(sys.argv[1]), int(sys.argv[2])
print("listening", flush=True)
seen, deadline = set(), time.monotonic() + 10
while last not in seen and time.monotonic() < deadline:
    try:
        frame = s.recv(65535)
    except TimeoutError:
        continue
    if frame[12:14] == b"\x08\x00" and frame[23] == 6 and frame[26:30] == src:
        seen.add(struct.unpack("!H", frame[18:20])[0])
print(" ".join(str(i) for i in sorted(seen)), flush=True)
"""

FRAGMENTED, WHOLE, CONTROL = 4242, 4243, 4244


@pytest.mark.parametrize(
    ("sender", "excluded", "program"),
    [
        ("client", 9090, "pod_ingress"),  # a meshed pod of the node; it excludes outbound 9090
        ("plain", 7070, "uplink_ingress"),  # another node's pod; neighbor excludes inbound 7070
    ],
)
def test_a_fragmented_syn_to_a_meshed_pod_does_not_reach_it(
    dplab: Lab, node1: NodeDatapath, sender: str, excluded: int, program: str
) -> None:
    source, neighbor = ip(dplab, sender), ip(dplab, "neighbor")
    sniffer = dplab.popen(
        "neighbor", "python3", "-c", SNIFF, source, str(CONTROL), stdout=subprocess.PIPE, text=True
    )
    try:
        assert sniffer.stdout is not None and sniffer.stdout.readline().strip() == "listening"
        dplab.exec(
            sender, "python3", "-c", SEND, neighbor,
            f"8080:{FRAGMENTED}:frag", f"8080:{WHOLE}:whole", f"{excluded}:{CONTROL}:whole",
            check=True, timeout=10,
        )  # fmt: skip
        arrived = sniffer.stdout.readline().split()
    finally:
        sniffer.kill()
        sniffer.wait()
    # The excluded port's SYN is not captured: it arrives, and proves the sniffer sees what
    # passes; the whole SYN to 8080 went to a listener, and the fragmented one nowhere (the old
    # programs let it through: "4242 4244").
    assert arrived == [str(CONTROL)]
    assert node1.datapath.counters()[program]["fragment"] == 2  # type: ignore[union-attr]
