import random

import pytest

from agent.policy.traffic.outlier import (
    EJECTED,
    HEALTHY,
    JITTER,
    PROBE,
    OutlierDetector,
    OutlierSettings,
)


def detector(n=3, endpoints=("a", "b", "c", "d"), percent=50, base=10.0, top=100.0):
    d = OutlierDetector(OutlierSettings(n, base, top, percent), random.Random(7))
    d.sync(endpoints)
    return d


def test_ejects_after_n_consecutive_failures():
    d = detector()
    assert d.failure("a", 0.0) is None
    assert d.failure("a", 0.0) is None
    assert d.failure("a", 0.0) == "ejected"
    assert d.health["a"].state == EJECTED
    assert not d.available("a", 1.0)
    assert d.events["ejected"] == 1


def test_a_success_resets_the_count():
    d = detector()
    d.failure("a", 0.0)
    d.failure("a", 0.0)
    d.success("a")
    assert d.failure("a", 0.0) is None
    assert d.health["a"].state == HEALTHY


def test_one_probe_after_the_penalty_decides():
    d = detector()
    for _ in range(3):
        d.failure("a", 0.0)
    until = d.health["a"].until
    assert 10.0 * (1 - JITTER) <= until <= 10.0
    assert d.available("a", until)
    assert d.health["a"].state == PROBE
    d.attempt("a")
    assert not d.available("a", until)  # only one probe at a time
    d.success("a")
    assert d.health["a"].state == HEALTHY
    assert d.events["returned"] == 1


def test_an_endpoint_past_its_penalty_is_shown_as_probe_not_ejected_for_0s():
    d = detector()
    for _ in range(3):
        d.failure("a", 0.0)
    until = d.health["a"].until
    assert d.health["a"].describe(until - 1.0)["state"] == EJECTED
    assert d.health["a"].describe(until - 1.0)["ejected_for"] == pytest.approx(1.0)
    late = d.health["a"].describe(until + 300.0)  # nobody asked for "a" since
    assert late["state"] == PROBE and late["ejected_for"] == 0.0
    assert d.health["a"].state == EJECTED  # describing changes nothing


def test_failed_probe_ejects_again_for_twice_as_long_up_to_the_maximum():
    d = detector(base=10.0, top=35.0)
    for _ in range(3):
        d.failure("a", 0.0)
    now = 0.0
    penalties = []
    for _ in range(4):
        now = d.health["a"].until
        assert d.available("a", now)
        d.attempt("a")
        d.failure("a", now)
        penalties.append(d.health["a"].until - now)
    for penalty, nominal in zip(penalties, (20.0, 35.0, 35.0, 35.0), strict=True):
        assert nominal * (1 - JITTER) <= penalty <= nominal
    assert d.events["probe_failed"] == 4


def test_successful_probe_lowers_the_next_penalty():
    d = detector(base=10.0, top=1000.0)
    for _ in range(3):
        d.failure("a", 0.0)
    now = d.health["a"].until
    d.available("a", now)
    d.attempt("a")
    d.failure("a", now)  # second ejection in a row
    assert d.health["a"].ejections == 2
    now = d.health["a"].until
    d.available("a", now)
    d.attempt("a")
    d.success("a")
    assert d.health["a"].ejections == 1


def test_abandoned_probe_can_be_retried():
    d = detector()
    for _ in range(3):
        d.failure("a", 0.0)
    now = d.health["a"].until
    d.available("a", now)
    d.attempt("a")
    d.abandon("a")
    assert d.available("a", now)


@pytest.mark.parametrize(
    ("endpoints", "percent", "ejectable"),
    [(4, 50, 2), (2, 50, 1), (1, 50, 0), (3, 100, 3), (5, 0, 0)],
)
def test_never_ejects_more_than_the_configured_share(endpoints, percent, ejectable):
    ips = [f"10.0.0.{i}" for i in range(endpoints)]
    d = detector(n=1, endpoints=ips, percent=percent)
    for ip in ips:
        d.failure(ip, 0.0)
    assert len(d.ejected()) == ejectable
    assert d.events["capped"] == endpoints - ejectable


def test_sync_forgets_removed_and_adds_new_endpoints():
    d = detector(n=1)
    d.failure("a", 0.0)
    d.sync(["b", "e"])
    assert set(d.health) == {"b", "e"}
    assert d.health["e"].state == HEALTHY


def test_describe_reports_the_remaining_penalty():
    d = detector(n=1)
    d.failure("a", 0.0)
    info = d.health["a"].describe(1.0)
    assert info["state"] == EJECTED
    assert 0 < info["ejected_for"] < 10.0
