"""One HTTP server on one address, as a component of ``nodemesh agent``.

The admin API (``AdminComponent``) and ``/metrics`` (``TelemetryComponent``) are both this: bind
on the agent's event loop at ``start`` (so a 200 proves the data plane's loop turns), stay
not-ready while not listening, close on ``stop``. A taken address is the likely failure (a
second agent in the same network namespace), so the error names the option that moves it.
"""

from __future__ import annotations

import logging

from agent.base.component import Component
from agent.base.http import MAX_PER_SOURCE, Handler, HttpServer


class HttpComponent(Component):
    """Base of the agent components that are one HTTP endpoint; subclasses set the texts."""

    name: str
    serves: str  # what is served, in messages: "the admin API", "metrics"
    url_path: str  # the path shown in the startup log line
    option: str  # the command-line option that chooses the address
    not_listening: str  # the readiness reason while the server is not listening
    per_source: int | None = MAX_PER_SOURCE  # connections one address may hold (agent.base.http)

    def __init__(self, handler: Handler, address: tuple[str, int]) -> None:
        self.address = address
        self.port = address[1]
        self._server = HttpServer(handler, per_source=self.per_source)

    async def start(self) -> None:
        host, port = self.address
        try:
            self.port = await self._server.start(host, port)
        except OSError as e:
            raise OSError(
                f"cannot serve {self.serves} on {host}:{port}: {e.strerror}; is another agent "
                f"running in this network namespace? choose another {self.option}"
            ) from e
        # Logged under the subclass's module, so ``/logging?logger=`` levels still apply per area.
        log = logging.getLogger(type(self).__module__)
        log.info("%s on http://%s:%d%s", self.serves, host, self.port, self.url_path)

    def not_ready(self) -> list[str]:
        return [] if self._server.listening else [self.not_listening]

    async def stop(self) -> None:
        await self._server.stop()
