"""The admin API as a component of ``nodemesh agent`` (served on the agent's event loop)."""

from __future__ import annotations

from agent.admin.api import AdminApi, AdminSources
from agent.base.endpoint import HttpComponent


class AdminComponent(HttpComponent):
    name = "admin"
    serves = "the admin API"
    url_path = "/"
    option = "--admin-address"
    not_listening = "admin: API is not listening"
    # Its clients (the CLI, tap long-polls) all come from 127.0.0.1: a per-address limit would
    # only lower its total of 64 (``agent.base.http``).
    per_source = None

    def __init__(self, *, address: tuple[str, int], sources: AdminSources) -> None:
        self.api = AdminApi(sources)
        super().__init__(self.api.handle, address)
