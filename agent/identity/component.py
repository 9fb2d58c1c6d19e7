"""The identity manager as a component of ``nodemesh agent`` (``agent.app.mesh_components``).

It owns the CA client and the manager, follows the store for this node's meshed identities once
the event loop runs, and reports each identity without a valid certificate as a readiness reason
(``identity: CA unreachable since <t>, certificate for <id> expired at <t>``, or ``no
certificate yet``), so ``/healthz/ready`` turns 200 only when every local meshed pod can be
served with mTLS. An identity whose renewal fails while its certificate is still valid keeps the
agent ready (dropping a node's traffic would not bring the CA back) and is reported by
``degraded()`` for /status instead. The proxy gets certificates through ``component.manager``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from agent.base.component import Component
from agent.identity.caclient import CA_SERVER_NAME, CaClient
from agent.identity.manager import IdentityManager, follow_store
from agent.identity.metrics import CountingFetcher
from agent.state import StateStore


class IdentityComponent(Component):
    name = "identity"

    def __init__(
        self,
        *,
        node: str,
        store: StateStore,
        ca_address: str,
        ca_root: Path,
        token_file: Path,
        server_name: str = CA_SERVER_NAME,
        validity_seconds: int = 0,
    ) -> None:
        self._node = node
        self._store = store
        self.client = CaClient(
            ca_address,
            root_file=ca_root,
            token_file=token_file,
            server_name=server_name,
            validity_seconds=validity_seconds,
        )
        self.manager = IdentityManager(CountingFetcher(self.client))
        self._unsubscribe: Callable[[], None] | None = None

    async def start(self) -> None:
        self._unsubscribe = follow_store(self.manager, self._store, self._node)

    def not_ready(self) -> list[str]:
        return [f"identity: {t.describe()}" for t in self.manager.troubles() if not t.valid]

    def degraded(self) -> list[str]:
        return [f"identity: {t.describe()}" for t in self.manager.troubles() if t.valid]

    def certificates(self) -> list[dict[str, object]]:
        """Each local identity's state and public certificate facts (metrics, admin API)."""
        return self.manager.states()

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        await self.manager.close()
        await self.client.close()
