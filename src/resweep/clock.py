"""Wall-clock timestamps as resweep writes them: local time with its offset."""

from __future__ import annotations

import datetime
import math
import time

# (second, its local date and time, its UTC offset) as text: one datetime a second, not one a call,
# because formatting one costs a worker about 4 us, twice per config.
_second_text: tuple[int, str, str] = (-1, "", "")


def now_iso() -> str:
    """Local wall-clock time with its offset, to the millisecond."""
    global _second_text
    now = time.time()
    second = math.floor(now)
    micro = round((now - second) * 1e6)  # rounded to the microsecond first, as datetime does
    if micro == 1_000_000:
        second, micro = second + 1, 0
    cached_second, date_time, offset = _second_text
    if second != cached_second:
        zone = datetime.timezone(datetime.timedelta(seconds=time.localtime(second).tm_gmtoff))
        text = datetime.datetime.fromtimestamp(second, zone).isoformat()
        date_time, offset = text[:19], text[19:]
        _second_text = (second, date_time, offset)
    return f"{date_time}.{micro // 1000:03d}{offset}"


def reset() -> None:
    """Forget the second formatted last: needed after the process changes its time zone."""
    global _second_text
    _second_text = (-1, "", "")
