"""What the admin API says about the agent's configuration and state source."""

from __future__ import annotations

import json
from pathlib import Path

from agent.admin.wiring import effective_config, source_view
from agent.config import AgentConfig, CaSettings


def test_effective_config_is_json_with_paths_and_never_file_contents(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cr3t-bearer-token")
    config = AgentConfig(
        node="node1",
        pin_dir=tmp_path / "pins",
        cluster_file=tmp_path / "cluster.yaml",
        ca=CaSettings("10.0.0.1:15012", tmp_path / "root.pem", token),
    )
    dumped = json.dumps(effective_config(config))
    out = json.loads(dumped)
    assert out["ca"]["token_file"] == str(token)
    assert out["admin_address"] == "127.0.0.1:15000" and out["capture_mark"] == "0x1539"
    assert "s3cr3t" not in dumped


class _Kube:
    ready = True

    def stats(self) -> dict[str, dict[str, int]]:
        return {"pods": {"lists": 1, "errors": 2}}


class _File:
    path = Path("/run/cluster.yaml")
    loads = 3
    last_error = "nodes[0]: bad"


def test_source_view_names_the_source_and_its_health() -> None:
    assert source_view(_Kube()) == {
        "source": "kubernetes",
        "synced": True,
        "sync": {"pods": {"lists": 1, "errors": 2}},
    }
    assert source_view(_File()) == {
        "source": "file",
        "path": "/run/cluster.yaml",
        "loads": 3,
        "last_error": "nodes[0]: bad",
    }
    assert source_view(None) == {"source": None}
