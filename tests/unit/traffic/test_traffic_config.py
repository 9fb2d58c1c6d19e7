import json

import pytest

from agent.policy.schema import PolicyError
from agent.policy.traffic.config import (
    TrafficConfig,
    TrafficPolicyError,
    compile_policy,
    duration,
)
from agent.state import Service
from tests.unit.traffic.traffic_helpers import traffic_policy

SERVICE = Service("server", "default", ("10.96.0.10",), selector={"app": "server"})


def test_empty_spec_is_the_defaults():
    config = compile_policy(traffic_policy({}))
    assert config == TrafficConfig(policy="default/tp", generation=1)


def test_full_spec_compiles_to_seconds_and_sets():
    spec = {
        "loadBalancer": {"type": "LEAST_CONNECTIONS", "localityPreference": "SAME_NODE"},
        "connectionPool": {
            "maxConnections": 10,
            "maxPendingConnects": 2,
            "connectTimeout": "2s",
            "idleTimeout": "1m30s",
        },
        "outlierDetection": {"consecutiveFailures": 2, "baseEjectionTime": "250ms"},
        "retries": {"attempts": 3, "perTryTimeout": "500ms", "retryOn": ["refused"]},
        "faultInjection": {
            "delay": {"percent": 5, "fixedDelay": "100ms"},
            "abort": {"percent": 1.5, "mode": "REFUSE"},
            "sourceSelector": {"matchLabels": {"app": "client"}},
        },
        "split": {
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}, "weight": 90},
                {"name": "v2", "labels": {"version": "v2"}, "weight": 10},
            ],
            "stickyBySourceIP": True,
        },
    }
    c = compile_policy(traffic_policy(spec), SERVICE)
    assert (c.balancer, c.locality, c.max_connections, c.max_pending) == (
        "LEAST_CONNECTIONS",
        "SAME_NODE",
        10,
        2,
    )
    assert (c.connect_timeout, c.idle_timeout, c.per_try_timeout) == (2.0, 90.0, 0.5)
    assert (c.consecutive_failures, c.base_ejection, c.max_ejection) == (2, 0.25, 300.0)
    assert (c.retries, c.retry_on) == (3, frozenset({"refused"}))
    assert c.fault is not None and (c.fault.delay, c.fault.abort_mode) == (0.1, "REFUSE")
    assert dict(c.fault.source_labels or {}) == {"app": "client"}
    assert [s.name for s in c.subsets] == ["v1", "v2"] and c.sticky
    json.dumps(c.describe())  # plain data for /config_dump


@pytest.mark.parametrize(
    ("text", "seconds"), [("250ms", 0.25), ("1m30s", 90.0), ("1.5h", 5400.0), ("2s500ms", 2.5)]
)
def test_durations(text, seconds):
    assert duration(text, "p") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "-1s", "5x", "ms", "0s", "0ms"])
def test_bad_durations_are_refused(text):
    with pytest.raises(TrafficPolicyError):
        duration(text, "p")


def test_per_try_longer_than_connect_timeout_is_refused():
    spec = {"connectionPool": {"connectTimeout": "1s"}, "retries": {"perTryTimeout": "2s"}}
    with pytest.raises(PolicyError, match=r"^test.spec.retries.perTryTimeout: 2s exceeds"):
        traffic_policy(spec)


def test_per_try_defaults_to_the_connect_timeout():
    c = compile_policy(traffic_policy({"connectionPool": {"connectTimeout": "3s"}}))
    assert c.per_try_timeout == 3.0


def test_subsets_with_the_same_labels_are_refused():
    spec = {
        "split": {
            "subsets": [
                {"name": "a", "labels": {"version": "v1"}, "weight": 50},
                {"name": "b", "labels": {"version": "v1"}, "weight": 50},
            ]
        }
    }
    with pytest.raises(PolicyError, match=r"subsets\[1\].labels: subset 'b' has the same"):
        traffic_policy(spec)


def test_subset_contradicting_the_service_selector_is_unknown():
    spec = {
        "split": {
            "subsets": [
                {"name": "v1", "labels": {"app": "server", "version": "v1"}, "weight": 50},
                {"name": "other", "labels": {"app": "client"}, "weight": 50},
            ]
        }
    }
    with pytest.raises(TrafficPolicyError, match="subset 'other' is unknown to Service server"):
        compile_policy(traffic_policy(spec), SERVICE)
    compile_policy(traffic_policy(spec))  # without the Service nothing can be said


@pytest.mark.parametrize(
    ("spec", "where"),
    [
        ({"split": {"subsets": [{"name": "a", "labels": {"v": "1"}, "weight": 60}]}}, "sum to 100"),
        ({"connectionPool": {"connectTimeout": "-1s"}}, "does not match the pattern"),
        ({"connectionPool": {"idleTimeout": "0s"}}, "longer than zero"),
        ({"retries": {"perTryTimeout": "0ms"}}, "longer than zero"),
        ({"outlierDetection": {"baseEjectionTime": "0s"}}, "longer than zero"),
        (
            {"retries": {"perTryTimeout": "2s"}, "connectionPool": {"connectTimeout": "1s"}},
            "exceeds",
        ),
        ({"loadBalancer": {"type": "FASTEST"}}, "not allowed"),
        ({"faultInjection": {}}, "needs a delay or an abort"),
    ],
)
def test_bad_policies_are_refused_when_validated(spec, where):
    """Schema rules and the whole-spec checks both fail in ``validate_policy``, so both sources
    refuse the policy (the file source keeps its previous state, the kube source the previous
    version, with an Accepted=False condition)."""
    with pytest.raises(PolicyError, match=where):
        traffic_policy(spec)


@pytest.mark.parametrize(
    ("spec", "path", "hint"),
    [
        (
            {"outlierDetection": {"consecutive5xxErrors": 3}},
            "consecutive5xxErrors",
            "use consecutiveFailures",
        ),
        ({"outlierDetection": {"interval": "10s"}}, "interval", "no equivalent"),
        ({"loadBalancer": {"simple": "LEAST_REQUEST"}}, "simple", "use type: PEAK_EWMA"),
        ({"connectionPool": {"tcp": {"maxConnections": 1}}}, "tcp", "connectionPool is flat"),
        ({"trafficPolicy": {}}, "trafficPolicy", "its fields (loadBalancer"),
        ({"host": "web"}, "host", "name the Service in targetRef"),
    ],
)
def test_an_istio_destination_rule_field_is_refused_with_its_nodemesh_spelling(spec, path, hint):
    """The schema refuses the field as any unknown one, and an Istio user is told where the
    same setting lives in a TrafficPolicy."""
    with pytest.raises(PolicyError) as refused:
        traffic_policy(spec)
    message = str(refused.value)
    assert f".{path}: unknown field" in message and "; allowed fields: " in message
    assert f"; Istio's DestinationRule {path}: {hint}" in message


def test_an_unknown_field_without_an_istio_equivalent_gets_no_hint():
    with pytest.raises(PolicyError) as refused:
        traffic_policy({"outlierDetection": {"consecutiveFailurez": 3}})
    assert "Istio" not in str(refused.value)
