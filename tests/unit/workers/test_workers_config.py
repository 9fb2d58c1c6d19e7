"""``--workers N``: its default (auto), its bounds, and that workers need a CA."""

from __future__ import annotations

import argparse

import pytest

from agent.config import MAX_WORKERS, ConfigError, add_arguments, from_args

BASE = ["--node", "node1", "--cluster-file", "cluster.yaml"]
CA = ["--ca-address", "10.0.0.1:15012", "--ca-root", "root.pem", "--token-file", "token"]


def parse(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([*BASE, *extra])


def test_the_default_is_auto_one_per_usable_cpu_and_one_without_a_ca(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("agent.base.cpus.usable_cpus_here", lambda: 3)
    assert from_args(parse(*CA)).workers == 3
    monkeypatch.setattr("agent.base.cpus.usable_cpus_here", lambda: 1)
    assert from_args(parse(*CA)).workers == 1
    monkeypatch.setattr("agent.base.cpus.usable_cpus_here", lambda: 64)
    assert from_args(parse(*CA)).workers == MAX_WORKERS
    assert from_args(parse()).workers == 1  # no CA: no proxy, nothing to spread
    assert from_args(parse(*CA, "--workers", "4")).workers == 4
    assert from_args(parse(*CA, "--workers", "1")).workers == 1


@pytest.mark.parametrize("count", ["0", "-1", str(MAX_WORKERS + 1)])
def test_out_of_bounds(count: str) -> None:
    with pytest.raises(ConfigError, match=f"--workers {count}: expected 1 to {MAX_WORKERS}"):
        from_args(parse(*CA, "--workers", count))


def test_workers_need_a_ca() -> None:
    with pytest.raises(ConfigError, match=r"needs a CA .* use --workers 1"):
        from_args(parse("--workers", "2"))


def test_auto_is_the_usable_cpus_capped_and_one_without_a_ca(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("agent.base.cpus.usable_cpus_here", lambda: 3)
    assert from_args(parse(*CA, "--workers", "auto")).workers == 3
    monkeypatch.setattr("agent.base.cpus.usable_cpus_here", lambda: 64)
    assert from_args(parse(*CA, "--workers", "auto")).workers == MAX_WORKERS
    assert from_args(parse("--workers", "auto")).workers == 1  # no CA: no proxy to spread


def test_a_word_other_than_auto_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"--workers many: expected a number .* or auto"):
        from_args(parse(*CA, "--workers", "many"))
