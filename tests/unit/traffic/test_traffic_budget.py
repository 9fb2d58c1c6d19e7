from agent.policy.traffic.budget import RetryBudget


def test_floor_allows_retries_when_quiet():
    b = RetryBudget(percent=0, min_per_second=1, window=10.0)
    assert all(b.try_retry(0.0) for _ in range(10))
    assert not b.try_retry(0.0)
    assert b.exhausted == 1


def test_ratio_of_requests():
    b = RetryBudget(percent=20, min_per_second=0, window=10.0)
    for _ in range(100):
        b.request(1.0)
    allowed = sum(b.try_retry(1.0) for _ in range(50))
    assert allowed == 20
    assert b.exhausted == 30
    assert b.totals(1.0) == (100, 20)


def test_old_traffic_ages_out_of_the_window():
    b = RetryBudget(percent=50, min_per_second=0, window=10.0)
    for _ in range(10):
        b.request(0.0)
    assert sum(b.try_retry(0.0) for _ in range(10)) == 5
    assert not b.try_retry(5.0)
    assert b.totals(10.5) == (0, 0)
    b.request(10.5)
    b.request(10.5)
    assert b.try_retry(10.5)


def test_zero_budget_never_retries():
    b = RetryBudget(percent=0, min_per_second=0, window=10.0)
    b.request(0.0)
    assert not b.try_retry(0.0)
