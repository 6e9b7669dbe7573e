"""Loaded (through PYTHONPATH) by the Python processes that tests run with a wall clock moved
by libfaketime (tests/clock.py). libfaketime 0.9.10 turns the absolute monotonic deadline of
clock_nanosleep, which Python's time.sleep uses, into an invalid one when the monotonic clock
is not faked (EINVAL); faking it instead makes every timed lock wait hang. So the monotonic
clock stays real and time.sleep waits in select(), which libfaketime leaves alone."""

import select
import time


def _sleep(seconds: float) -> None:
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    select.select([], [], [], seconds)


time.sleep = _sleep
