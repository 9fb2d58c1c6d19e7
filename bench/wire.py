"""What crossed the wire: a pcap reader and a TLS/plaintext judge, sans-IO.

The harness trusts a path's numbers only after it has seen the path's bytes on the node-to-node
segment (``tcpdump -w`` on the lab bridge) while a client sent a random plaintext marker through
it. This module turns that capture into facts: TCP streams reassembled per direction, the marker
found or not, TLS record streams walked record by record, the ServerHello's negotiated version and
cipher suite read (both travel in clear text, even in TLS 1.3). A mesh that forgot to encrypt,
or a "direct" path that silently went through a proxy, shows up as a failed check rather than as
a flattering number.

Only what the lab produces is read: classic pcap (µs or ns timestamps, either byte order),
Ethernet frames, IPv4, TCP.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from dataclasses import dataclass, field

LINKTYPE_ETHERNET = 1
ETH_P_IP = 0x0800
ETH_P_8021Q = 0x8100
TLS_HANDSHAKE = 0x16
TLS_APPLICATION_DATA = 0x17
TLS_RECORD_VERSIONS = {0x0301, 0x0302, 0x0303}
HANDSHAKE_SERVER_HELLO = 0x02
EXT_SUPPORTED_VERSIONS = 0x002B
# The IANA names of the suites a Python or OpenSSL peer negotiates, and the `openssl speed -evp`
# cipher that bounds each one's bulk rate.
CIPHER_SUITES = {
    0x1301: ("TLS_AES_128_GCM_SHA256", "aes-128-gcm"),
    0x1302: ("TLS_AES_256_GCM_SHA384", "aes-256-gcm"),
    0x1303: ("TLS_CHACHA20_POLY1305_SHA256", "chacha20-poly1305"),
    0xC02B: ("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "aes-128-gcm"),
    0xC02C: ("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "aes-256-gcm"),
    0xC02F: ("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "aes-128-gcm"),
    0xC030: ("TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", "aes-256-gcm"),
    0xCCA8: ("TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256", "chacha20-poly1305"),
    0xCCA9: ("TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256", "chacha20-poly1305"),
}
TLS_VERSIONS = {0x0303: "TLSv1.2", 0x0304: "TLSv1.3"}


class CaptureError(ValueError):
    """The capture file is not something this reader understands."""


@dataclass(frozen=True)
class Segment:
    src: str  # ip:port
    dst: str
    seq: int
    payload: bytes


@dataclass
class TlsStream:
    """One direction of a TCP stream that parsed as TLS records from its first byte."""

    src: str
    dst: str
    version: str = ""  # from the ServerHello (server -> client direction only)
    cipher: str = ""
    speed_cipher: str = ""
    application_bytes: int = 0  # sum of application_data record lengths


@dataclass
class WireReport:
    streams: int = 0
    payload_bytes: int = 0
    marker_seen: bool = False
    tls: list[TlsStream] = field(default_factory=list)

    @property
    def tls_application_bytes(self) -> int:
        return sum(s.application_bytes for s in self.tls)

    @property
    def negotiated(self) -> TlsStream | None:
        """The first stream with a ServerHello (its version and cipher)."""
        return next((s for s in self.tls if s.cipher), None)


def read_pcap(data: bytes) -> list[Segment]:
    """TCP segments with payload from a classic pcap of Ethernet frames."""
    if len(data) < 24:
        raise CaptureError("capture is shorter than a pcap header: did tcpdump start?")
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        order = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        order = ">"
    else:
        raise CaptureError(f"not a classic pcap file (magic {magic.hex()}); use tcpdump -w")
    (linktype,) = struct.unpack(order + "I", data[20:24])
    if linktype != LINKTYPE_ETHERNET:
        raise CaptureError(f"link type {linktype} is not Ethernet; capture on the lab's bridge")
    segments, offset = [], 24
    while offset + 16 <= len(data):
        incl = struct.unpack(order + "I", data[offset + 8 : offset + 12])[0]
        frame = data[offset + 16 : offset + 16 + incl]
        offset += 16 + incl
        segment = _tcp_segment(frame)
        if segment is not None and segment.payload:
            segments.append(segment)
    return segments


def _tcp_segment(frame: bytes) -> Segment | None:
    if len(frame) < 14:
        return None
    ethertype, at = struct.unpack("!H", frame[12:14])[0], 14
    if ethertype == ETH_P_8021Q and len(frame) >= 18:
        ethertype, at = struct.unpack("!H", frame[16:18])[0], 18
    if ethertype != ETH_P_IP or len(frame) < at + 20:
        return None
    ihl = (frame[at] & 0x0F) * 4
    total = struct.unpack("!H", frame[at + 2 : at + 4])[0]
    if frame[at + 9] != 6 or len(frame) < at + ihl + 20:
        return None
    src_ip = ".".join(str(b) for b in frame[at + 12 : at + 16])
    dst_ip = ".".join(str(b) for b in frame[at + 16 : at + 20])
    tcp = at + ihl
    sport, dport, seq = struct.unpack("!HHI", frame[tcp : tcp + 8])
    data_off = (frame[tcp + 12] >> 4) * 4
    payload = frame[tcp + data_off : at + total]
    return Segment(f"{src_ip}:{sport}", f"{dst_ip}:{dport}", seq, payload)


def reassemble(segments: list[Segment]) -> dict[tuple[str, str], bytes]:
    """Each direction's bytes in sequence order; retransmitted ranges are kept once.

    Sequence-number wrap-around is not handled: a capture covers one short exchange.
    """
    by_flow: dict[tuple[str, str], dict[int, bytes]] = defaultdict(dict)
    for s in segments:
        known = by_flow[(s.src, s.dst)].get(s.seq, b"")
        if len(s.payload) > len(known):
            by_flow[(s.src, s.dst)][s.seq] = s.payload
    streams = {}
    for flow, pieces in by_flow.items():
        out, end = bytearray(), -1
        for seq, payload in sorted(pieces.items()):
            if end < 0 or seq >= end:
                out += payload
            elif seq + len(payload) > end:  # overlaps what we have: keep only the new tail
                out += payload[end - seq :]
            end = max(end, seq + len(payload))
        streams[flow] = bytes(out)
    return streams


def tls_stream(src: str, dst: str, data: bytes) -> TlsStream | None:
    """Walk ``data`` as TLS records; None unless it starts with a handshake record."""
    if len(data) < 5 or data[0] != TLS_HANDSHAKE:
        return None
    stream, at = TlsStream(src, dst), 0
    while at + 5 <= len(data):
        kind, version, length = struct.unpack("!BHH", data[at : at + 5])
        if version not in TLS_RECORD_VERSIONS or not 20 <= kind <= 24:
            break  # the capture missed a segment; what was walked so far stands
        body = data[at + 5 : at + 5 + length]
        if kind == TLS_APPLICATION_DATA:
            stream.application_bytes += len(body)
        elif kind == TLS_HANDSHAKE and body[:1] == bytes([HANDSHAKE_SERVER_HELLO]):
            _read_server_hello(stream, body[4:])
        at += 5 + length
    return stream


def _read_server_hello(stream: TlsStream, hello: bytes) -> None:
    if len(hello) < 35:
        return
    legacy_version = struct.unpack("!H", hello[:2])[0]
    sid_len = hello[34]
    at = 35 + sid_len
    suite = struct.unpack("!H", hello[at : at + 2])[0]
    name, speed = CIPHER_SUITES.get(suite, (f"0x{suite:04x}", ""))
    stream.cipher, stream.speed_cipher = name, speed
    stream.version = TLS_VERSIONS.get(legacy_version, f"0x{legacy_version:04x}")
    at += 3  # cipher suite, compression method
    end = at + 2 + struct.unpack("!H", hello[at : at + 2])[0] if len(hello) >= at + 2 else at
    at += 2
    while at + 4 <= min(end, len(hello)):
        ext, length = struct.unpack("!HH", hello[at : at + 4])
        if ext == EXT_SUPPORTED_VERSIONS and length == 2:
            selected = struct.unpack("!H", hello[at + 4 : at + 6])[0]
            stream.version = TLS_VERSIONS.get(selected, f"0x{selected:04x}")
        at += 4 + length


def inspect(capture: bytes, marker: bytes) -> WireReport:
    """Everything the judge needs from one capture."""
    streams = reassemble(read_pcap(capture))
    report = WireReport(streams=len(streams))
    for (src, dst), data in streams.items():
        report.payload_bytes += len(data)
        report.marker_seen = report.marker_seen or marker in data
        found = tls_stream(src, dst, data)
        if found is not None:
            report.tls.append(found)
    return report


def judge(report: WireReport, *, expect_tls: bool, sent: int) -> tuple[bool, str]:
    """Did the wire carry ``sent`` marker bytes the way the path claims? (ok, explanation)"""
    if not expect_tls:
        if report.marker_seen:
            return (
                True,
                "plaintext marker seen on the node-to-node link (no encryption, as claimed)",
            )
        return False, "plaintext marker NOT seen on the node-to-node link: not a direct path"
    if report.marker_seen:
        return False, "plaintext marker seen on the node-to-node link: the path is NOT encrypted"
    hello = report.negotiated
    if hello is None:
        return False, "no TLS ServerHello on the node-to-node link: the path is NOT TLS"
    if report.tls_application_bytes < sent:
        return False, (
            f"only {report.tls_application_bytes} bytes of TLS application data for {sent} "
            "bytes sent: part of the traffic took another way"
        )
    return True, (
        f"{hello.version} {hello.cipher} to {hello.src}; "
        f"{report.tls_application_bytes} bytes of TLS application data, marker absent"
    )
