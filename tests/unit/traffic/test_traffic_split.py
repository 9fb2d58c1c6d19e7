import random
from collections import Counter

from agent.policy.traffic.config import Subset
from agent.policy.traffic.split import Splitter

V1 = Subset("v1", {"version": "v1"}, 90)
V2 = Subset("v2", {"version": "v2"}, 10)


def within(observed, n, p, sigmas=4.0):
    return abs(observed - n * p) <= sigmas * (n * p * (1 - p)) ** 0.5


def test_90_10_split_holds_within_statistical_bounds():
    s = Splitter([V1, V2], sticky=False, rng=random.Random(11))
    n = 20000
    picks = Counter(s.choose({"v1", "v2"}, "10.0.0.1") for _ in range(n))
    assert within(picks["v2"], n, 0.10)
    assert s.decisions == picks


def test_empty_subset_gives_its_share_to_the_others():
    s = Splitter([V1, V2], sticky=False, rng=random.Random(12))
    assert {s.choose({"v2"}, "ip") for _ in range(100)} == {"v2"}
    assert s.choose(set(), "ip") is None


def test_zero_weight_subset_gets_nothing():
    s = Splitter(
        [Subset("v1", {"v": "1"}, 100), Subset("v2", {"v": "2"}, 0)],
        sticky=False,
        rng=random.Random(0),
    )
    assert {s.choose({"v1", "v2"}, "ip") for _ in range(200)} == {"v1"}
    assert s.choose({"v2"}, "ip") is None


def test_sticky_by_source_ip_is_stable_and_still_split():
    s = Splitter([V1, V2], sticky=True, rng=random.Random(13))
    clients = [f"10.1.{i // 250}.{i % 250}" for i in range(5000)]
    first = {ip: s.choose({"v1", "v2"}, ip) for ip in clients}
    assert all(s.choose({"v1", "v2"}, ip) == first[ip] for ip in clients[:500])
    assert within(Counter(first.values())["v2"], len(clients), 0.10)


def test_subset_of_matches_all_labels_first_subset_wins():
    s = Splitter([V1, Subset("any", {"app": "x"}, 0)], sticky=False, rng=random.Random(0))
    assert s.subset_of({"version": "v1", "app": "x"}) == "v1"
    assert s.subset_of({"app": "x"}) == "any"
    assert s.subset_of({"version": "v3"}) is None
