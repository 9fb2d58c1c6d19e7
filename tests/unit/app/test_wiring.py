"""What the admin API says about the agent's configuration and state source."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from agent.config import AgentConfig, CaSettings
from agent.sources.localfile import LocalFileSource
from agent.state import StateStore
from agent.wiring import effective_config, source_view


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


def test_a_cert_ttl_of_zero_is_dumped_as_the_cas_default_not_zero_seconds(tmp_path: Path) -> None:
    """``--cert-ttl`` unset is ``cert_ttl_seconds=0`` in the settings: ask the CA for no
    lifetime. ``/config_dump`` must not read as "certificates live 0 s": it gives no number
    and says who decides; a set TTL is shown as the request it is."""
    ca = CaSettings("10.0.0.1:15012", tmp_path / "root.pem", tmp_path / "token")
    config = AgentConfig(node="node1", pin_dir=tmp_path / "pins", ca=ca)
    default = json.loads(json.dumps(effective_config(config)))["ca"]
    assert default["cert_ttl_seconds"] is None
    assert default["cert_ttl"].startswith("the CA's default")
    assert default["address"] == "10.0.0.1:15012"
    asked = dataclasses.replace(config, ca=dataclasses.replace(ca, cert_ttl_seconds=3600))
    requested = effective_config(asked)["ca"]
    assert isinstance(requested, dict) and requested["cert_ttl_seconds"] == 3600
    assert requested["cert_ttl"].startswith("3600s requested")
    assert effective_config(dataclasses.replace(config, ca=None))["ca"] is None


def test_source_view_names_the_source_and_its_health(tmp_path: Path) -> None:
    """The local file source as the admin API shows it (the Kubernetes source's view is
    checked in tests/unit/sources/test_kube_source.py against a fake API server)."""
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("nodes: [\n")
    source = LocalFileSource(cluster, StateStore())
    assert not source.reload()
    view = source_view(source)
    assert view["source"] == "file" and view["path"] == str(cluster) and view["loads"] == 0
    assert isinstance(view["last_error"], str) and "cluster.yaml" in view["last_error"]
    assert source.stats() == {"cluster-file": {"loads": 0}}
    assert source_view(None) == {"source": None}
