"""The one time format the store compares as text: UTC, microseconds, a ``Z`` (gateway/clock.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from gateway import clock

ZONES = st.sampled_from([UTC, timezone(timedelta(hours=8)), timezone(timedelta(hours=-5, minutes=-30))])


@given(st.datetimes(min_value=datetime(1000, 1, 2), max_value=datetime(9999, 12, 30), timezones=ZONES))
def test_iso_is_utc_with_microseconds_and_a_z(moment: datetime) -> None:
    text = clock.iso(moment)
    assert text == moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # the format as first defined
    assert datetime.fromisoformat(text) == moment


@given(st.datetimes(timezones=st.just(UTC)), st.datetimes(timezones=st.just(UTC)))
def test_iso_strings_sort_in_time_order(first: datetime, second: datetime) -> None:
    if first.year >= 1000 and second.year >= 1000:
        assert (clock.iso(first) < clock.iso(second)) == (first < second)
