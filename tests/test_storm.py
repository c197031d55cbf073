"""Storm alerts as a pure decision: one alert per agent per window, once the refusals pile up."""

from __future__ import annotations

from qpu_gateway.policy.file import StormAlert
from qpu_gateway.policy.storm import StormWatch

RULE = StormAlert(refused_calls=5, window_seconds=10)


def test_an_alert_comes_at_the_threshold_and_names_the_codes() -> None:
    watch = StormWatch()
    alerts = [watch.refused("bot", "rate_limited" if i % 2 else "quota_exhausted", 100 + i, RULE) for i in range(5)]
    assert alerts[:4] == [None] * 4
    storm = alerts[4]
    assert storm is not None and storm.agent == "bot" and storm.refused == 5
    assert storm.codes == {"quota_exhausted": 3, "rate_limited": 2}
    assert storm.describe() == "5 refused calls in 10 s (quota_exhausted x3, rate_limited x2)"


def test_one_alert_per_window_then_again_if_the_storm_goes_on() -> None:
    watch = StormWatch()
    fired = [t for t in range(40) if watch.refused("bot", "rate_limited", 1000 + t * 0.5, RULE)]
    # Ten refusals a second: the first alert at the 5th, the next once 10 s have passed.
    assert fired == [4, 24]


def test_refusals_spread_thinner_than_the_window_never_alert() -> None:
    watch = StormWatch()
    assert not any(watch.refused("slow", "rate_limited", t * 3.0, RULE) for t in range(100))


def test_agents_are_counted_apart() -> None:
    watch = StormWatch()
    for i in range(4):
        assert watch.refused("a", "rate_limited", i, RULE) is None
        assert watch.refused("b", "rate_limited", i, RULE) is None
    assert watch.refused("a", "rate_limited", 5, RULE) is not None
    assert watch.refused("b", "rate_limited", 5, RULE) is not None
