"""A fake Kubernetes API server for tests, speaking the HTTP protocol the official client uses.

Threaded HTTP/1.1 on 127.0.0.1 (random port). It serves list (with resourceVersion, label and
field selectors, ``limit``/``continue`` pages), get, create (409 AlreadyExists), replace (409 on a
stale resourceVersion), merge patch, delete, the ``/status`` subresource, and watch streams:
chunked JSON lines ``ADDED``/``MODIFIED``/``DELETED``/``BOOKMARK``/``ERROR``, replayed from the
requested resourceVersion, or an ``ERROR`` event with code 410 when that version was compacted
away. ``restart()`` cuts every open watch mid-stream (as a real API server restart does), and can
forget the history so that resuming watchers must relist. TokenReview answers for tokens the test
registered. ``absent_groups`` makes API groups 404, as when their CRDs are not installed. Tests
only: the product never ships it.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fakeapi.store import (
    BY_PATH,
    ApiError,
    ObjectStore,
    Resource,
    Selector,
    watch_events,
)

_PATH = re.compile(
    r"^/(?:api/(?P<cv>v1)|apis/(?P<g>[^/]+)/(?P<v>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>status))?$"
)


def _flag(value: str | None) -> bool:
    """A query boolean as Go's strconv.ParseBool reads it (the Python client sends ``True``)."""
    return (value or "").lower() in ("1", "t", "true")


class FakeApiServer:
    """Start with ``with FakeApiServer() as api:``; point a client at ``api.url``."""

    def __init__(
        self,
        *,
        bookmark_interval: float = 0.5,
        require_token: str | None = None,
        tls: ssl.SSLContext | None = None,
    ):
        self.store = ObjectStore()
        self.bookmark_interval = bookmark_interval
        self.require_token = require_token
        self.tokens: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path?query), for assertions
        self.available = True
        # API groups whose CRDs are "not installed": every request to them is a 404.
        self.absent_groups: set[str] = set()
        self._pages: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        # Continue tokens are numbered: a token made of the page's list's ``id()`` could name
        # two lists at once (an id is reused once its list is freed), so a reflector paging
        # pods could be handed another resource's rest, listed at the same revision.
        self._page_numbers = itertools.count(1)
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._http.daemon_threads = True
        self.scheme = "http"
        if tls is not None:  # serve HTTPS, as in-cluster clients require
            self._http.socket = tls.wrap_socket(self._http.socket, server_side=True)
            self.scheme = "https"
        self._http.fake = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._http.serve_forever, args=(0.05,), name="fakeapi", daemon=True
        )

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self._http.server_address[1]}"

    def __enter__(self) -> FakeApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.store.cut_watches()
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=5)

    # -- test controls -------------------------------------------------------------------------
    def restart(self, *, forget_history: bool = False) -> None:
        """Cut every open watch; with ``forget_history`` old resourceVersions become 410 Gone."""
        if forget_history:
            self.store.compact()
            self._pages.clear()
        self.store.cut_watches()

    def add_token(
        self,
        token: str,
        username: str,
        *,
        uid: str = "",
        groups: tuple[str, ...] = (),
        audiences: tuple[str, ...] | None = None,
    ) -> None:
        """Make TokenReview authenticate ``token``; ``audiences=None`` accepts any audience."""
        self.tokens[token] = {
            "username": username,
            "uid": uid,
            "groups": list(groups),
            "audiences": audiences,
        }

    def resource(self, kind_or_plural: str) -> Resource:
        for r in BY_PATH.values():
            if kind_or_plural in (r.kind, r.plural):
                return r
        raise KeyError(kind_or_plural)

    # Convenience for tests: the same operations without HTTP.
    def create(self, kind: str, obj: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
        ns = obj.get("metadata", {}).get("namespace", namespace)
        return self.store.create(self.resource(kind), ns, obj)

    def patch(
        self,
        kind: str,
        name: str,
        patch: dict[str, Any],
        namespace: str = "default",
        *,
        status: bool = False,
    ) -> dict[str, Any]:
        return self.store.patch(self.resource(kind), namespace, name, patch, status=status)

    def delete(self, kind: str, name: str, namespace: str = "default") -> dict[str, Any]:
        return self.store.delete(self.resource(kind), namespace, name)

    def get(self, kind: str, name: str, namespace: str = "default") -> dict[str, Any]:
        return self.store.get(self.resource(kind), namespace, name)

    def find(self, kind: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
        """``get``, or None while the object does not exist (a probe for ``wait_for``, which
        an object some agent creates later would otherwise fail with a 404)."""
        try:
            return self.get(kind, name, namespace)
        except ApiError as e:
            if e.code != 404:
                raise
            return None

    def list_objects(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.store.list_objects(self.resource(kind), namespace, Selector())[1]

    # -- request handling ----------------------------------------------------------------------
    def token_review(self, body: dict[str, Any]) -> dict[str, Any]:
        spec = body.get("spec") or {}
        entry = self.tokens.get(spec.get("token", ""))
        wanted = spec.get("audiences") or []
        status: dict[str, Any] = {"authenticated": False}
        if entry is None:
            status["error"] = "invalid bearer token"
        elif (
            entry["audiences"] is not None and wanted and not set(wanted) & set(entry["audiences"])
        ):
            status["error"] = "token audiences do not match"
        else:
            audiences = (
                wanted
                if entry["audiences"] is None
                else [a for a in entry["audiences"] if not wanted or a in wanted]
            )
            status = {
                "authenticated": True,
                "audiences": audiences,
                "user": {k: entry[k] for k in ("username", "uid", "groups")},
            }
        return {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }

    def list_page(
        self, resource: Resource, namespace: str | None, selector: Selector, query: dict[str, str]
    ) -> dict[str, Any]:
        token = query.get("continue")
        if token:
            if token not in self._pages:
                raise ApiError(410, "Expired", "The provided continue parameter is too old")
            rv, items = self._pages.pop(token)
        else:
            rv, items = self.store.list_objects(resource, namespace, selector)
        limit = int(query.get("limit") or 0)
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if limit and len(items) > limit:
            number = next(self._page_numbers)
            nxt = base64.urlsafe_b64encode(f"{rv}/{number}/{limit}".encode()).decode()
            self._pages[nxt] = (rv, items[limit:])
            items = items[:limit]
            meta["continue"] = nxt
            meta["remainingItemCount"] = len(self._pages[nxt][1])
        return {
            "kind": f"{resource.kind}List",
            "apiVersion": resource.api_version,
            "metadata": meta,
            "items": items,
        }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers, body: two writes; no delayed-ACK stall
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        return  # quiet: tests assert on fake.requests instead

    @property
    def fake(self) -> FakeApiServer:
        return self.server.fake

    def _send_json(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b"{}"
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise ApiError(400, "BadRequest", f"request body is not JSON: {e}") from e

    def _dispatch(self, method: str) -> None:
        fake = self.fake
        fake.requests.append((method, self.path))
        try:
            if not fake.available:
                raise ApiError(503, "ServiceUnavailable", "the fake API server is unavailable")
            scheme, _, token = self.headers.get("Authorization", "").partition(" ")
            if fake.require_token and (scheme.lower(), token) != ("bearer", fake.require_token):
                raise ApiError(401, "Unauthorized", "Unauthorized")
            self._route(method)
        except ApiError as e:
            self._send_json(e.code, e.status())

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path == "/apis/authentication.k8s.io/v1/tokenreviews" and method == "POST":
            self._send_json(201, self.fake.token_review(self._body()))
            return
        m = _PATH.match(url.path)
        if m is None:
            raise ApiError(404, "NotFound", f"the server could not find {url.path}")
        group, version = ("", "v1") if m["cv"] else (m["g"], m["v"])
        ns, plural, name, sub = m["ns"], m["plural"], m["name"], m["sub"]
        resource = BY_PATH.get((group, version, plural))
        if resource is None or group in self.fake.absent_groups:
            raise ApiError(404, "NotFound", f"the server could not find the resource {plural}")
        if sub and not (resource.status_subresource or resource.plural in ("pods", "services")):
            raise ApiError(404, "NotFound", f"{plural} has no status subresource")
        namespace = ns if resource.namespaced else ""
        store = self.fake.store
        selector = Selector(query.get("labelSelector", ""), query.get("fieldSelector", ""))
        if method == "GET" and name is None:
            if _flag(query.get("watch")):
                self._watch(resource, ns if resource.namespaced else None, selector, query)
            else:
                self._send_json(
                    200,
                    self.fake.list_page(
                        resource, ns if resource.namespaced else None, selector, query
                    ),
                )
        elif method == "GET":
            self._send_json(200, store.get(resource, namespace, name))
        elif method == "POST" and name is None:
            body = self._body()
            self._send_json(201, store.create(resource, namespace or "", body))
        elif method == "PUT" and name:
            self._send_json(
                200, store.update(resource, namespace, name, self._body(), status=bool(sub))
            )
        elif method == "PATCH" and name:
            body = self._body()
            if not isinstance(body, dict):
                raise ApiError(415, "UnsupportedMediaType", "only merge patches are supported")
            self._send_json(200, store.patch(resource, namespace, name, body, status=bool(sub)))
        elif method == "DELETE" and name:
            gone = store.delete(resource, namespace, name)
            self._send_json(
                200,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Success",
                    "details": {
                        "name": name,
                        "kind": resource.plural,
                        "uid": gone["metadata"]["uid"],
                    },
                },
            )
        else:
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {url.path}")

    def _chunk(self, event: dict[str, Any]) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _watch(
        self, resource: Resource, namespace: str | None, selector: Selector, query: dict[str, str]
    ) -> None:
        store = self.fake.store
        bookmarks = _flag(query.get("allowWatchBookmarks"))
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 3600)
        # The epoch is taken before the headers go out: a client that has its response may
        # restart the server at once, and that restart must cut this watch.
        with store.cond:
            epoch = store.epoch
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with store.cond:
            requested = query.get("resourceVersion", "")
            if requested in ("", "0"):
                _, items = store.list_objects(resource, namespace, selector)
                pending = [("ADDED", o) for o in items]
                last = store.rv
            elif int(requested) < store.compacted_rv:
                gone = ApiError(
                    410, "Expired", f"too old resource version: {requested} ({store.compacted_rv})"
                )
                pending, last = [("ERROR", gone.status())], -1
            else:
                last = int(requested)
                pending = watch_events(store.changes_since(last), resource, namespace, selector)
                last = store.rv
        try:
            self._stream(resource, namespace, selector, pending, last, epoch, bookmarks, deadline)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _stream(
        self,
        resource: Resource,
        namespace: str | None,
        selector: Selector,
        pending: list[tuple[str, dict[str, Any]]],
        last: int,
        epoch: int,
        bookmarks: bool,
        deadline: float,
    ) -> None:
        store = self.fake.store
        while True:
            for kind, obj in pending:
                self._chunk({"type": kind, "object": obj})
            if last < 0:
                break  # after an ERROR event the server ends the watch
            with store.cond:
                woke = store.cond.wait_for(
                    lambda: store.rv > last or store.epoch != epoch,  # noqa: B023 (called at once)
                    timeout=self.fake.bookmark_interval,
                )
                if store.epoch != epoch:
                    self.close_connection = True  # a restart: drop without the final chunk
                    return
                pending = watch_events(store.changes_since(last), resource, namespace, selector)
                last = store.rv
            if not woke and bookmarks:
                self._chunk(
                    {
                        "type": "BOOKMARK",
                        "object": {
                            "kind": resource.kind,
                            "apiVersion": resource.api_version,
                            "metadata": {"resourceVersion": str(last)},
                        },
                    }
                )
            if time.monotonic() >= deadline:
                break
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")
