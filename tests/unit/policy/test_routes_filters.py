"""Header modifiers, redirects and rewrites: head in, head out (mesh conformance cases)."""

from __future__ import annotations

import pytest

from agent.policy.routes import HttpRequest, modify_headers, redirect_location, rewrite_request
from agent.policy.routes.model import (
    PATH_PREFIX,
    HeaderModifier,
    HttpMatch,
    PathMatch,
    PathModifier,
    Redirect,
    Rewrite,
)


def test_request_header_modifier_set_add_remove() -> None:
    """MeshHTTPRouteRequestHeaderModifier: set replaces, add appends, remove drops."""
    headers = [("x-header-set", "old"), ("x-header-add", "a"), ("x-remove", "1"), ("x-remove", "2")]
    modifier = HeaderModifier(
        set=(("x-header-set", "set-overwrites-values"),),
        add=(("x-header-add", "add-appends-values"),),
        remove=("x-remove",),
    )
    assert modify_headers(headers, modifier) == [
        ("x-header-add", "a"),
        ("x-header-set", "set-overwrites-values"),
        ("x-header-add", "add-appends-values"),
    ]


def _prefix(value: str) -> HttpMatch:
    return HttpMatch(PathMatch(PATH_PREFIX, value))


@pytest.mark.parametrize(
    ("match", "path", "replacement", "expected"),
    [
        # The Gateway API's ReplacePrefixMatch table.
        ("/foo/bar", "/foo/bar", "/xyz", "/xyz"),
        ("/foo/bar", "/foo/bar", "/xyz/", "/xyz/"),
        ("/foo/bar", "/foo/bar/", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo/bar/", "/xyz/", "/xyz/"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo/", "/xyz", "/xyz/"),
        ("/foo", "/foo/bar", "/xyz", "/xyz/bar"),
        ("/foo", "/foo/bar", "/xyz/", "/xyz/bar"),
        ("/", "/foo", "/xyz", "/xyz/foo"),
        # MeshHTTPRouteRewritePath.
        ("/prefix/one", "/prefix/one/two", "/one", "/one/two"),
        ("/strip-prefix", "/strip-prefix/three", "/", "/three"),
        ("/strip-prefix", "/strip-prefix", "/", "/"),
    ],
)
def test_replace_prefix_match(match: str, path: str, replacement: str, expected: str) -> None:
    request = HttpRequest.from_target("GET", f"{path}?q=1", authority="echo")
    rewrite = Rewrite(path=PathModifier("ReplacePrefixMatch", replacement))
    out = rewrite_request(request, rewrite, _prefix(match))
    assert (out.path, out.query) == (expected, "q=1")


def test_rewrite_full_path_and_hostname() -> None:
    request = HttpRequest.from_target("GET", "/full/one/two", [("host", "echo")], authority="echo")
    out = rewrite_request(
        request, Rewrite("one.example.org", PathModifier("ReplaceFullPath", "/one")), None
    )
    assert (out.path, out.authority, list(out.headers)) == (
        "/one",
        "one.example.org",
        [("host", "one.example.org")],
    )


@pytest.mark.parametrize(
    ("redirect", "target", "location"),
    [
        # MeshHTTPRouteRedirectHostAndStatus / Port / Scheme / Path.
        (
            Redirect(hostname="example.org", status=301),
            "/hostname-redirect",
            "http://example.org:8080/hostname-redirect",
        ),
        (Redirect(port=8083), "/port-redirect", "http://echo:8083/port-redirect"),
        (Redirect(scheme="https"), "/scheme-redirect", "https://echo/scheme-redirect"),
        (Redirect(scheme="https", port=8443), "/s", "https://echo:8443/s"),
        (Redirect(scheme="http", port=80), "/s", "http://echo/s"),
        (Redirect(), "/keep?x=1", "http://echo:8080/keep?x=1"),  # the Service port
        (
            Redirect(path=PathModifier("ReplaceFullPath", "/full-path-replacement")),
            "/full/path/original",
            "http://echo:8080/full-path-replacement",
        ),
        (
            Redirect(path=PathModifier("ReplacePrefixMatch", "/replacement-prefix")),
            "/original-prefix/lemon",
            "http://echo:8080/replacement-prefix/lemon",
        ),
    ],
)
def test_redirect_location(redirect: Redirect, target: str, location: str) -> None:
    request = HttpRequest.from_target("GET", target, authority="echo:8080")
    match = _prefix("/original-prefix")
    assert redirect_location(request, redirect, match, service_port=8080) == location


def test_redirect_keeps_ipv6_brackets() -> None:
    request = HttpRequest.from_target("GET", "/", authority="[fd00::1]:8080")
    assert (
        redirect_location(request, Redirect(port=9), None, service_port=8080)
        == "http://[fd00::1]:9/"
    )
