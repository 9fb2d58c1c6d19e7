"""``policy_path``: Istio's default (BASE) path normalization, case by case."""

from __future__ import annotations

import pytest

from agent.policy.paths import policy_path, policy_target


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/a/b", "/a/b"),
        ("", ""),
        ("*", "*"),
        ("/%61/%7e/%2D", "/a/~/-"),  # unreserved: decoded
        ("/a%2fb", "/a%2Fb"),  # reserved: kept, hex upper-cased (Istio BASE)
        ("/a%zz", "/a%zz"),  # not an escape: left alone
        ("//admin", "//admin"),  # slashes are not merged by default
        ("/a//b/../c", "/a//c"),
        ("/a/b/..", "/a/"),
        ("/a/.", "/a/"),
        ("/..", "/"),
        ("/.hidden/x", "/.hidden/x"),
        ("/a\\b", "/a/b"),
    ],
)
def test_normalized_as_istio_base(target: str, expected: str) -> None:
    assert policy_path(target) == expected


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/a/../b", ("/b", "sent")),
        ("http://h:80", ("/", "h:80")),
        ("https://h/a/../b", ("/b", "h")),
        ("/x?://y", ("/x?://y", "sent")),  # origin form that merely contains "://"
        ("*", ("*", "sent")),
    ],
)
def test_the_absolute_form_gives_its_path_and_its_authority(
    target: str, expected: tuple[str, str]
) -> None:
    assert policy_target(target, "sent") == expected
