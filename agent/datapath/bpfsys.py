"""Pinned BPF objects and map access through libbpf, without BCC.

BCC compiles and loads the programs once; everything after that (pinning, adopting pinned
objects after a restart, reading and writing maps, reading program statistics) goes through
libbpf's small stable C API. That is what lets a restarted agent adopt the kernel's state without
recompiling, and gives one error type, ``BpfError``, carrying the errno and the operation.
libbpf ships with BCC on Debian (``libbpfcc`` depends on ``libbpf1``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator
from functools import cache
from typing import TypeVar

S = TypeVar("S", bound=ctypes.Structure)

# struct bpf_prog_info offsets (include/uapi/linux/bpf.h); stable since the fields were added.
_PROG_INFO_SIZE = 232
_OFF_ID = 4
_OFF_NAME = 64
_OFF_RUN_TIME_NS = 192
_OFF_RUN_CNT = 200


class BpfError(OSError):
    """A bpf(2) operation failed; ``errno`` tells why."""


@cache
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise BpfError(
            errno.ENOENT, f"cannot load libbpf ({name}): install Debian's libbpf1 (make setup)"
        ) from e
    vp, c = ctypes.c_void_p, ctypes.c_char_p
    for fn, args in {
        "bpf_obj_pin": [ctypes.c_int, c],
        "bpf_obj_get": [c],
        "bpf_map_update_elem": [ctypes.c_int, vp, vp, ctypes.c_uint64],
        "bpf_map_lookup_elem": [ctypes.c_int, vp, vp],
        "bpf_map_delete_elem": [ctypes.c_int, vp],
        "bpf_map_get_next_key": [ctypes.c_int, vp, vp],
        "bpf_obj_get_info_by_fd": [ctypes.c_int, vp, ctypes.POINTER(ctypes.c_uint32)],
        "libbpf_num_possible_cpus": [],
    }.items():
        getattr(lib, fn).argtypes = args
        getattr(lib, fn).restype = ctypes.c_int
    return lib


def _check(result: int, what: str) -> int:
    if result < 0:
        code = -result if result != -1 else ctypes.get_errno()
        raise BpfError(code, f"{what}: {os.strerror(code)}")
    return result


def pin(fd: int, path: str) -> None:
    _check(_lib().bpf_obj_pin(fd, path.encode()), f"pin {path}")


def open_pinned(path: str) -> int:
    """A new file descriptor for the object pinned at ``path`` (the caller closes it)."""
    return _check(_lib().bpf_obj_get(path.encode()), f"open pinned {path}")


def possible_cpus() -> int:
    return _check(_lib().libbpf_num_possible_cpus(), "count possible CPUs")


class Map:
    """One BPF map by file descriptor, with typed keys and values."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name

    def update(self, key: ctypes._CData, value: ctypes._CData) -> None:
        _check(
            _lib().bpf_map_update_elem(self.fd, ctypes.byref(key), ctypes.byref(value), 0),
            f"update map {self.name}",
        )

    def delete(self, key: ctypes._CData) -> bool:
        """Remove ``key``; False when it was not there."""
        try:
            _check(_lib().bpf_map_delete_elem(self.fd, ctypes.byref(key)), f"delete {self.name}")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def lookup_into(self, key: ctypes._CData, value: ctypes._CData) -> bool:
        """Fill ``value`` with the entry for ``key``; False when absent."""
        rc = _lib().bpf_map_lookup_elem(self.fd, ctypes.byref(key), ctypes.byref(value))
        if rc < 0 and ctypes.get_errno() == errno.ENOENT:
            return False
        _check(rc, f"lookup in map {self.name}")
        return True

    def keys(self, key_type: type[S]) -> Iterator[S]:
        """Every key, read with get_next_key (entries added during iteration may be missed)."""
        previous: S | None = None
        while True:
            nxt = key_type()
            prev_ref = None if previous is None else ctypes.byref(previous)
            rc = _lib().bpf_map_get_next_key(self.fd, prev_ref, ctypes.byref(nxt))
            if rc < 0:
                if ctypes.get_errno() == errno.ENOENT:
                    return
                _check(rc, f"iterate map {self.name}")
            yield nxt
            previous = nxt

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def percpu_sum(m: Map, index: int) -> int:
    """The sum over CPUs of a u64 slot of a per-CPU array."""
    values = (ctypes.c_uint64 * possible_cpus())()
    key = ctypes.c_uint32(index)
    if not m.lookup_into(key, values):
        return 0
    return sum(values)


def prog_stats(fd: int) -> tuple[int, str, int, int]:
    """(id, name, run_time_ns, run_cnt) of a program. The run statistics only grow while
    ``kernel.bpf_stats_enabled=1``."""
    buf = (ctypes.c_uint8 * _PROG_INFO_SIZE)()
    size = ctypes.c_uint32(_PROG_INFO_SIZE)
    _check(_lib().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(size)), "read program info")
    raw = bytes(buf)
    name = raw[_OFF_NAME : _OFF_NAME + 16].split(b"\0", 1)[0].decode()
    return (
        int.from_bytes(raw[_OFF_ID : _OFF_ID + 4], "little"),
        name,
        int.from_bytes(raw[_OFF_RUN_TIME_NS : _OFF_RUN_TIME_NS + 8], "little"),
        int.from_bytes(raw[_OFF_RUN_CNT : _OFF_RUN_CNT + 8], "little"),
    )
