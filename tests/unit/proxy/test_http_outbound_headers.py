"""The source's request fields as routes read them (``http_router.TextHeaders``): the same
text pairs the routes got as a list, decoded only once something reads them."""

from __future__ import annotations

from agent.policy.routes.filters import modify_headers
from agent.policy.routes.model import HeaderModifier, HttpRequest
from agent.proxy.http_router import TextHeaders

FIELDS = [(b"host", b"web"), (b"x-user", b"caf\xe9"), (b"x-user", b"b")]
TEXT = [("host", "web"), ("x-user", "café"), ("x-user", "b")]


def test_text_headers_read_as_the_decoded_list_and_decode_once_read() -> None:
    headers = TextHeaders(FIELDS)
    assert len(headers) == 3
    assert headers._text is None  # nothing read yet: nothing decoded
    assert list(headers) == TEXT
    assert (headers[1], headers[-1], list(headers[1:])) == (TEXT[1], TEXT[2], TEXT[1:])
    assert ("x-user", "b") in headers and ("x-user", "c") not in headers
    request = HttpRequest.from_target("GET", "/a?q=1", headers, authority="web")
    assert request.header("x-user") == "café,b"
    changed = modify_headers(request.headers, HeaderModifier(set=(("host", "api"),)))
    assert changed == [*TEXT[1:], ("host", "api")]
