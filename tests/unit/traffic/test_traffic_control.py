import random
from dataclasses import replace

from agent.policy.traffic.control import TrafficControl
from agent.state import Endpoint, Service, ServicePort, StateStore, Workload
from tests.unit.traffic.traffic_helpers import FakeClock, traffic_policy

SPLIT = {
    "split": {
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}, "weight": 90},
            {"name": "v2", "labels": {"version": "v2"}, "weight": 10},
        ]
    }
}


def pod(name, ip, version, node="node2"):
    labels = {"app": "server", "version": version}
    return Workload(f"default/{name}", name, "default", "server", node, (ip,), labels)


def store_with_service():
    store = StateStore()
    with store.update() as tx:
        tx.put_workload(pod("s1", "10.244.2.2", "v1"))
        tx.put_workload(pod("s2", "10.244.2.3", "v2"))
        tx.put_service(
            Service(
                "server",
                "default",
                ("10.96.0.10",),
                (ServicePort(80, 8080),),
                {"app": "server"},
                (Endpoint("10.244.2.2", "default/s1"), Endpoint("10.244.2.3", "default/s2")),
            )
        )
    return store


def put(store, policy):
    with store.update() as tx:
        tx.put_policy(policy)


def control():
    return TrafficControl(clock=FakeClock(), rng=random.Random(3))


def svc(store):
    return store.snapshot().services[("default", "server")]


def test_without_policy_the_defaults_apply_and_endpoints_carry_labels():
    store, tc = store_with_service(), control()
    traffic = tc.service(store.snapshot(), svc(store))
    assert traffic.config.policy == "" and traffic.config.balancer == "PEAK_EWMA"
    assert traffic.endpoints["10.244.2.3"].labels["version"] == "v2"
    assert traffic.endpoints["10.244.2.3"].node == "node2"


def test_accepted_policy_is_in_force():
    store, tc = store_with_service(), control()
    put(store, traffic_policy(SPLIT))
    traffic = tc.service(store.snapshot(), svc(store))
    assert [s.name for s in traffic.config.subsets] == ["v1", "v2"]
    assert tc.conditions()["default/tp"]["reason"] == "Accepted"


def test_invalid_edit_keeps_the_previous_version_in_force():
    store, tc = store_with_service(), control()
    put(store, traffic_policy(SPLIT, generation=1))
    tc.service(store.snapshot(), svc(store))
    bad = {"split": {"subsets": [{"name": "v1", "labels": {"app": "other"}, "weight": 100}]}}
    put(store, traffic_policy(bad, generation=2))
    traffic = tc.service(store.snapshot(), svc(store))
    condition = tc.conditions()["default/tp"]
    assert condition["status"] == "False" and condition["reason"] == "Invalid"
    assert "unknown to Service server" in str(condition["message"])
    assert "generation 1 stays in force" in str(condition["message"])
    assert traffic.config.generation == 1 and len(traffic.config.subsets) == 2


def test_invalid_first_version_leaves_the_defaults():
    store, tc = store_with_service(), control()
    bad = {"split": {"subsets": [{"name": "v1", "labels": {"app": "other"}, "weight": 100}]}}
    put(store, traffic_policy(bad))
    assert tc.service(store.snapshot(), svc(store)).config.policy == ""


def test_second_policy_for_the_same_service_is_conflicted():
    store, tc = store_with_service(), control()
    put(store, traffic_policy({}, name="a"))
    put(store, traffic_policy({"loadBalancer": {"type": "RANDOM"}}, name="b"))
    traffic = tc.service(store.snapshot(), svc(store))
    assert traffic.config.policy == "default/a"
    assert tc.conditions()["default/b"]["reason"] == "Conflicted"


def test_policy_for_a_missing_service_waits_for_it():
    store, tc = StateStore(), control()
    put(store, traffic_policy({}))
    tc.update(store.snapshot())
    assert tc.conditions()["default/tp"]["reason"] == "TargetNotFound"


def test_dry_run_is_not_enforced():
    store, tc = store_with_service(), control()
    policy = traffic_policy({"loadBalancer": {"type": "RANDOM"}})
    put(store, replace(policy, dry_run=True))
    assert tc.service(store.snapshot(), svc(store)).config.balancer == "PEAK_EWMA"
    assert tc.conditions()["default/tp"]["reason"] == "DryRun"


def test_live_change_keeps_endpoint_history_and_deleted_policy_restores_defaults():
    store, tc = store_with_service(), control()
    put(store, traffic_policy({}))
    first = tc.service(store.snapshot(), svc(store))
    first.loads["10.244.2.2"].estimate = 0.5
    put(store, traffic_policy({"loadBalancer": {"type": "ROUND_ROBIN"}}, generation=2))
    second = tc.service(store.snapshot(), svc(store))
    assert second is first and second.config.balancer == "ROUND_ROBIN"
    assert second.loads["10.244.2.2"].estimate == 0.5
    with store.update() as tx:
        tx.delete("policies", ("TrafficPolicy", "default", "tp"))
    assert tc.service(store.snapshot(), svc(store)).config.policy == ""
    assert tc.conditions() == {}


def test_describe_lists_effective_policy_and_services():
    store, tc = store_with_service(), control()
    put(store, traffic_policy({}))
    tc.service(store.snapshot(), svc(store))
    info = tc.describe()
    assert set(info) == {"policies", "effective", "services"}
    assert "default/server" in info["effective"] and "default/server" in info["services"]


def test_accepted_condition_warns_about_a_subset_without_endpoints():
    store, tc = store_with_service(), control()
    spec = {
        "split": {
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}, "weight": 80},
                {"name": "v3", "labels": {"version": "v3"}, "weight": 20},
            ]
        }
    }
    put(store, traffic_policy(spec))
    tc.update(store.snapshot())
    condition = tc.conditions()["default/tp"]
    assert condition["reason"] == "Accepted"
    assert "subset(s) v3 select no ready endpoint now" in str(condition["message"])
