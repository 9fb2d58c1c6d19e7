import pytest

from bench import stats


def test_percentile_is_nearest_rank_and_an_observed_sample() -> None:
    samples = list(range(1, 1001))  # 1..1000
    assert stats.percentile(samples, 50) == 500
    assert stats.percentile(samples, 99) == 990
    assert stats.percentile(samples, 99.9) == 999
    assert stats.percentile(samples, 100) == 1000
    assert stats.percentile([7.5], 50) == 7.5


def test_percentiles_names_each_point_and_ignores_input_order() -> None:
    assert stats.percentiles([5, 1, 4, 2, 3], (50, 99.9)) == {"p50": 3, "p99.9": 5}


@pytest.mark.parametrize(("samples", "p"), [([], 50), ([1.0], 0), ([1.0], 101)])
def test_percentile_refuses_what_it_cannot_answer(samples: list[float], p: float) -> None:
    with pytest.raises(ValueError):
        stats.percentile(samples, p)


def test_ratio_and_median_are_none_when_undefined() -> None:
    assert stats.ratio(3.0, 2.0) == 1.5
    assert stats.ratio(None, 2.0) is None
    assert stats.ratio(3.0, 0.0) is None
    assert stats.median([3.0, 1.0, 2.0]) == 2.0
    assert stats.median([]) is None


def test_slope_fits_every_step() -> None:
    # 100 bytes per connection with one step 1,000 bytes above the line.
    points = [(0.0, 1e6), (100.0, 1e6 + 1e4), (200.0, 1e6 + 2e4 + 1e3), (300.0, 1e6 + 3e4)]
    assert stats.slope(points) == pytest.approx(100 + 1e3 * (200 - 150) / 50_000)
    assert stats.slope([(1.0, 2.0)]) is None
    assert stats.slope([(1.0, 2.0), (1.0, 3.0)]) is None
