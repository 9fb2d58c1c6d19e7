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

    def __init__(self, *, address: tuple[str, int], sources: AdminSources) -> None:
        self.api = AdminApi(sources)
        super().__init__(self.api.handle, address)
