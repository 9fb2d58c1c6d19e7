"""The admin API as a component of ``nodemesh agent`` (served on the agent's event loop)."""

from __future__ import annotations

import logging

from agent.admin.api import AdminApi, AdminSources
from agent.admin.http import HttpServer

log = logging.getLogger(__name__)


class AdminComponent:
    name = "admin"

    def __init__(self, *, address: tuple[str, int], sources: AdminSources) -> None:
        self.address = address
        self.api = AdminApi(sources)
        self._server = HttpServer(self.api.handle)
        self.port = address[1]

    async def start(self) -> None:
        host, port = self.address
        try:
            self.port = await self._server.start(host, port)
        except OSError as e:
            raise OSError(
                f"cannot serve the admin API on {host}:{port}: {e.strerror}; is another agent "
                "running in this network namespace? choose another --admin-address"
            ) from e
        log.info("admin API on http://%s:%d/", host, self.port)

    def not_ready(self) -> list[str]:
        return [] if self._server.listening else ["admin: API is not listening"]

    async def stop(self) -> None:
        await self._server.stop()
