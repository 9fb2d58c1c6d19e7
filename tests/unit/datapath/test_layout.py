"""Map encoding mirrors nodemesh.h: sizes, keys, exemption limits, round trips."""

from __future__ import annotations

import ctypes
import re

import pytest

from agent.base.constants import Listener
from agent.datapath import layout
from agent.datapath.layout import LayoutError, PodEntry
from agent.datapath.programs import source_dir


def header() -> str:
    return (source_dir() / "nodemesh.h").read_text()


def define(name: str) -> int:
    found = re.search(rf"#define {name} (\w+)", header())
    assert found, name
    return int(found.group(1), 0)


def test_constants_match_the_header() -> None:
    assert define("NM_LAYOUT_VERSION") == layout.LAYOUT_VERSION
    assert define("NM_MAX_EXCLUDED_PORTS") == layout.MAX_EXCLUDED_PORTS
    assert define("NM_POD_MESHED") == layout.POD_MESHED
    assert define("NM_SETTING_FAIL_OPEN") == layout.SETTING_FAIL_OPEN
    assert define("NM_COUNTER_COUNT") == len(layout.Counter)
    assert define("NM_PROG_COUNT") == len(layout.Program)
    assert define("NM_LISTENER_COUNT") == len(Listener)
    for c in layout.Counter:
        assert define(f"NM_CNT_{c.name}") == c
    for slot in Listener:
        assert define(f"NM_LISTENER_{slot.name}") == slot


def test_struct_sizes_match_the_c_layout() -> None:
    assert ctypes.sizeof(layout.AddrKey) == 20  # u32 family + u32 addr[4]
    assert ctypes.sizeof(layout.PodValue) == 8 + 2 * 2 * layout.MAX_EXCLUDED_PORTS


def test_ipv4_key_uses_first_four_bytes_in_network_order() -> None:
    key = layout.addr_key("10.244.1.2")
    assert key.family == 2
    assert bytes(key.addr) == bytes([10, 244, 1, 2]) + bytes(12)
    assert layout.key_ip(key) == "10.244.1.2"


def test_ipv6_key_fits_the_same_struct() -> None:
    key = layout.addr_key("fd00::1")
    assert key.family == 10 and layout.key_ip(key) == "fd00::1"


def test_bad_address_is_rejected() -> None:
    with pytest.raises(LayoutError, match="not an IP address"):
        layout.addr_key("10.0.0.300")


def test_pod_entry_round_trips() -> None:
    entry = PodEntry("10.0.0.5", 7, True, frozenset({9090, 22}), frozenset({15020}))
    value = layout.pod_value(entry)
    assert list(value.exclude_out)[:3] == [22, 9090, 0]
    assert layout.pod_entry(layout.addr_key("10.0.0.5"), value) == entry


def test_too_many_exempt_ports_name_the_annotation() -> None:
    entry = PodEntry("10.0.0.5", 7, True, frozenset(range(1, 18)))
    with pytest.raises(LayoutError, match="exclude-outbound-ports"):
        layout.pod_value(entry)


def test_counter_index_is_program_major() -> None:
    n = len(layout.Counter)
    assert layout.counter_index(layout.Program.UPLINK_INGRESS, layout.Counter.OWNED) == n + 1
