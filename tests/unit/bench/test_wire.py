"""The capture judge on hand-built pcaps: Ethernet/IPv4/TCP frames carrying exact TLS bytes."""

import struct

import pytest

from bench import wire

MARKER = b"NODEMESH-PLAINTEXT-MARKER-0123456789abcdef"


def frame(src: str, dst: str, sport: int, dport: int, seq: int, payload: bytes) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x18, 65535, 0, 0)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0, 64, 6, 0,
        bytes(int(b) for b in src.split(".")), bytes(int(b) for b in dst.split(".")),
    )  # fmt: skip
    padding = b"\0" * max(0, 46 - len(ip) - len(tcp) - len(payload))  # Ethernet minimum
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + tcp + payload + padding


def pcap(frames: list[bytes], *, order: str = "<", linktype: int = 1) -> bytes:
    out = struct.pack(order + "IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, linktype)
    for f in frames:
        out += struct.pack(order + "IIII", 0, 0, len(f), len(f)) + f
    return out


def record(kind: int, body: bytes) -> bytes:
    return struct.pack("!BHH", kind, 0x0303, len(body)) + body


def server_hello(suite: int, selected_version: int | None) -> bytes:
    ext = b""
    if selected_version is not None:
        ext = struct.pack("!HHH", wire.EXT_SUPPORTED_VERSIONS, 2, selected_version)
    hello = (
        struct.pack("!H", 0x0303) + b"\x11" * 32 + b"\x20" + b"\x22" * 32
        + struct.pack("!HB", suite, 0) + struct.pack("!H", len(ext)) + ext
    )  # fmt: skip
    return record(wire.TLS_HANDSHAKE, b"\x02" + len(hello).to_bytes(3, "big") + hello)


def tls_capture(app_records: int) -> bytes:
    client_hello = record(wire.TLS_HANDSHAKE, b"\x01\x00\x00\x00")
    server = server_hello(0x1302, 0x0304) + record(wire.TLS_APPLICATION_DATA, b"\xaa" * 100)
    data = b"".join(record(wire.TLS_APPLICATION_DATA, b"\xbb" * 1000) for _ in range(app_records))
    frames = [
        frame("10.244.1.2", "10.244.2.2", 40000, 15008, 1000, client_hello),
        frame("10.244.2.2", "10.244.1.2", 15008, 40000, 5000, server),
        # the client's data in two segments, delivered out of order, the first one twice
        frame("10.244.1.2", "10.244.2.2", 40000, 15008, 1000 + len(client_hello) + 500, data[500:]),
        frame("10.244.1.2", "10.244.2.2", 40000, 15008, 1000 + len(client_hello), data[:500]),
        frame("10.244.1.2", "10.244.2.2", 40000, 15008, 1000 + len(client_hello), data[:500]),
    ]
    return pcap(frames)


def test_tls_stream_is_read_with_its_negotiated_version_and_cipher() -> None:
    report = wire.inspect(tls_capture(app_records=5), MARKER)
    assert report.streams == 2
    assert not report.marker_seen
    hello = report.negotiated
    assert hello is not None
    assert (hello.version, hello.cipher, hello.speed_cipher) == (
        "TLSv1.3", "TLS_AES_256_GCM_SHA384", "aes-256-gcm",
    )  # fmt: skip
    assert hello.src == "10.244.2.2:15008"
    assert report.tls_application_bytes == 100 + 5 * 1000  # the retransmission counted once
    assert wire.judge(report, expect_tls=True, sent=5000)[0]


def test_a_tls12_hello_without_supported_versions_keeps_the_legacy_version() -> None:
    stream = wire.tls_stream("a:1", "b:2", server_hello(0xC02F, None))
    assert stream is not None
    assert (stream.version, stream.cipher) == ("TLSv1.2", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256")


def test_too_little_tls_data_means_part_of_the_traffic_went_elsewhere() -> None:
    report = wire.inspect(tls_capture(app_records=1), MARKER)
    ok, why = wire.judge(report, expect_tls=True, sent=64 * 1024)
    assert not ok
    assert "another way" in why


def test_plaintext_marker_passes_as_direct_and_fails_as_encrypted() -> None:
    half = len(MARKER) // 2  # split across two segments: found only after reassembly
    capture = pcap([
        frame("10.244.1.4", "10.244.2.3", 40001, 7000, 1, MARKER[:half]),
        frame("10.244.1.4", "10.244.2.3", 40001, 7000, 1 + half, MARKER[half:]),
    ])  # fmt: skip
    report = wire.inspect(capture, MARKER)
    assert report.marker_seen
    assert report.tls == []
    assert wire.judge(report, expect_tls=False, sent=len(MARKER))[0]
    ok, why = wire.judge(report, expect_tls=True, sent=len(MARKER))
    assert not ok
    assert "NOT encrypted" in why


def test_nothing_on_the_wire_is_neither_direct_nor_tls() -> None:
    report = wire.inspect(pcap([], order=">"), MARKER)
    assert report.streams == 0
    assert not wire.judge(report, expect_tls=False, sent=1)[0]
    ok, why = wire.judge(report, expect_tls=True, sent=1)
    assert not ok
    assert "ServerHello" in why


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "shorter than a pcap header"),
        (b"\x0a\x0d\x0d\x0a" + b"\0" * 28, "not a classic pcap"),
        (pcap([], linktype=113), "not Ethernet"),
    ],
)
def test_unreadable_captures_say_why(data: bytes, message: str) -> None:
    with pytest.raises(wire.CaptureError, match=message):
        wire.read_pcap(data)
