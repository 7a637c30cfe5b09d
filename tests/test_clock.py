"""The tracker's timestamps: the fast formatter agrees with datetime's to the microsecond."""

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from tracker import clock


def _reference(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@given(st.floats(min_value=0, max_value=4_102_444_800))  # 1970 to 2100
def test_iso_matches_datetime(ts: float) -> None:
    assert clock.iso(ts) == _reference(ts)


def test_iso_rounds_into_the_next_second_as_datetime_does() -> None:
    # the cached second of one call must not leak into the next one's text
    for ts in (1_700_000_000.9999996, 1_700_000_001.0000004, 1_700_000_000.5,
               1_699_999_999.9999999, 0.0):
        assert clock.iso(ts) == _reference(ts), ts


def test_iso_now_is_fixed_width_and_sorts() -> None:
    stamps = [clock.iso() for _ in range(1000)]
    assert all(len(s) == 27 and s.endswith("Z") for s in stamps)
    assert stamps == sorted(stamps)
