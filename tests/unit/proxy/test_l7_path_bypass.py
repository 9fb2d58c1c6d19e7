"""L7 paths as the destination authorizes them: spellings of ``/admin`` that a pod's server
reads as ``/admin`` must meet the policies written for ``/admin`` (Istio's default ``BASE``
path normalization), through ``http_inbound.authorize``, the one place every declared HTTP
port's requests are decided (HTTP/1.1 and HTTP/2, HBONE and plaintext)."""

from __future__ import annotations

import pytest

from agent.policy.authz import Request
from agent.proxy.core import Core
from agent.proxy.http1 import RequestHead
from agent.proxy.http_inbound import authorize
from agent.state import PolicyObject, StateStore
from tests.workloads import workload

SERVER = workload("server", "node1", "10.244.1.3", app="server")
CONNECTION = Request("10.244.2.2", "10.244.1.3", 8080, "spiffe://cluster.local/ns/default/sa/c")


def _core(spec: dict[str, object]) -> Core:
    store = StateStore()
    with store.update() as txn:
        txn.put_workload(SERVER)
        txn.put_policy(PolicyObject("AuthorizationPolicy", "default", "p", spec))
    return Core(node="node1", store=store, identities=None)  # type: ignore[arg-type]


def _allowed(core: Core, path: str, host: str = "server") -> bool:
    snap = core.snapshot()
    head = RequestHead("GET", path, host, "id")
    verdict = authorize(core, CONNECTION, SERVER, head, "t", core.policies(snap), snap, False)
    return verdict.allowed


DENY_ADMIN = {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}
ALLOW_PUBLIC = {"rules": [{"to": [{"operation": {"paths": ["/public/*"]}}]}]}

# Each of these reaches ``/admin...`` at a server that decodes unreserved percent-escapes,
# resolves dot segments, reads ``\`` as ``/`` or accepts the absolute form (RFC 9112 3.2.2).
ADMIN_SPELLINGS = [
    "/%61dmin",
    "/%61%64%6D%69%6E/users",
    "/./admin",
    "/public/../admin",
    "/public/%2e%2e/admin",
    "/public/%2E./admin",
    "/x/y/../../admin",
    "/../admin",
    "/public\\..\\admin",
    "http://server/admin",
    "HTTP://server:8080/admin/x",
]


@pytest.mark.parametrize("path", ADMIN_SPELLINGS)
def test_a_deny_on_a_path_denies_its_other_spellings(path: str) -> None:
    assert not _allowed(_core(DENY_ADMIN), path)


@pytest.mark.parametrize("path", ADMIN_SPELLINGS)
def test_an_allow_on_a_prefix_does_not_admit_a_path_that_leaves_it(path: str) -> None:
    assert not _allowed(_core(ALLOW_PUBLIC), path)


@pytest.mark.parametrize(
    "path",
    ["/public/a", "/public/%7Euser", "/public/a/./b", "/public/a/../b", "http://h/public/x"],
)
def test_paths_that_stay_inside_the_prefix_are_still_admitted(path: str) -> None:
    assert _allowed(_core(ALLOW_PUBLIC), path)


@pytest.mark.parametrize("path", ["/admins", "/administrator/x", "/admin"])
def test_the_plain_spelling_is_decided_as_before(path: str) -> None:
    assert not _allowed(_core(DENY_ADMIN), path)


def test_the_absolute_forms_authority_is_the_host_hosts_rules_compare() -> None:
    """A server that receives the absolute form ignores ``Host`` (RFC 9112 3.2.2)."""
    core = _core({"action": "DENY", "rules": [{"to": [{"operation": {"hosts": ["admin.svc"]}}]}]})
    assert not _allowed(core, "http://admin.svc/x", host="public.svc")
    assert _allowed(core, "/x", host="public.svc")
