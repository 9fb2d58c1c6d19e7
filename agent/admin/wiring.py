"""Plugs metrics (``--metrics-port``) and the admin API (``--admin-address``) into the agent.

They observe everything else, so they are assembled last from the agent's parts: the proxy's
connection registry (TCP metrics, access log, ``/connections``), the identity manager
(certificate states and expiry), the datapath (BPF counters, attachments), the state source
(loads, sync statistics, errors) and the agent's own readiness and drain.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from agent.admin.api import AdminSources
from agent.admin.component import AdminComponent
from agent.config import AgentConfig
from agent.datapath.datapath import Datapath
from agent.state import StateStore
from agent.telemetry.agentmetrics import AgentSources
from agent.telemetry.component import TelemetryComponent


class AgentParts(Protocol):
    config: AgentConfig
    store: StateStore
    datapath: Datapath
    source: Any
    components: list[Any]

    def not_ready(self) -> list[str]: ...

    def degraded(self) -> list[str]: ...

    def request_stop(self) -> None: ...


def _jsonable(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    return value


def effective_config(config: AgentConfig) -> dict[str, object]:
    """The agent's settings as JSON (paths, never file contents: no token, no key)."""
    out = {k: _jsonable(v) for k, v in dataclasses.asdict(config).items()}
    out["admin_address"] = f"{config.admin_address[0]}:{config.admin_address[1]}"
    out["capture_mark"] = hex(config.capture_mark)
    return out


def source_view(source: Any) -> dict[str, object]:
    """What the state source says about itself (local file or Kubernetes)."""
    if source is None:
        return {"source": None}
    if hasattr(source, "stats"):
        return {"source": "kubernetes", "synced": bool(source.ready), "sync": source.stats()}
    return {
        "source": "file",
        "path": str(getattr(source, "path", "")),
        "loads": getattr(source, "loads", 0),
        "last_error": getattr(source, "last_error", None),
    }


def _find(parts: AgentParts, name: str) -> Any:
    return next((c for c in parts.components if getattr(c, "name", None) == name), None)


def observability(parts: AgentParts) -> list[Any]:
    """The telemetry and admin components of ``parts`` (an ``agent.app.Agent``)."""
    proxy = _find(parts, "proxy")
    identity = _find(parts, "identity")
    registry = proxy.proxy.core.registry if proxy is not None else None
    certificates = identity.manager.states if identity is not None else None

    changed_at = [time.time()]  # the store's writer thread replaces the float: atomic
    parts.store.subscribe(lambda _snap, _kinds: changed_at.__setitem__(0, time.time()))

    def state_stats() -> Mapping[str, Mapping[str, int]]:
        src = parts.source
        if src is not None and hasattr(src, "stats"):
            return dict(src.stats())
        loads = getattr(src, "loads", 0)
        return {"cluster-file": {"loads": loads}}

    telemetry = TelemetryComponent(
        store=parts.store,
        address=("0.0.0.0", parts.config.metrics_port),
        connections=registry,
        sources=AgentSources(
            rejections=(lambda: registry.rejections) if registry is not None else None,
            denials=(lambda: registry.denials) if registry is not None else None,
            pool_size=(lambda: len(proxy.proxy.pool.connections())) if proxy else None,
            inbound_tunnels=(lambda: len(proxy.proxy.inbound.connections)) if proxy else None,
            certificates=certificates,
            capture_counters=parts.datapath.counters,
            state_stats=state_stats,
            state_version=lambda: parts.store.snapshot().version,
            state_error=lambda: getattr(parts.source, "last_error", None),
            state_changed_at=lambda: changed_at[0],
        ),
    )

    async def datapath_view() -> dict[str, object]:
        status = parts.datapath.status()
        status["attachments"] = await asyncio.to_thread(parts.datapath.attachments)
        return status

    admin = AdminComponent(
        address=parts.config.admin_address,
        sources=AdminSources(
            node=parts.config.node,
            store=parts.store,
            config=effective_config(parts.config),
            not_ready=parts.not_ready,
            degraded=parts.degraded,
            drain=parts.request_stop,
            connections=telemetry.tcp.live,
            certificates=certificates,
            datapath=datapath_view,
            state_source=lambda: source_view(parts.source),
            traffic=(
                (lambda: proxy.proxy.outbound.balanced.traffic.describe(parts.store.snapshot()))
                if proxy is not None
                else None
            ),
        ),
    )
    return [telemetry, admin]
