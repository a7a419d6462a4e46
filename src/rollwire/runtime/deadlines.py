"""A call's timeout as a deadline on the event loop's clock, and what is left of it: a call made of
several steps (a retry, a move to another server) gives each step what is left, so its caller's
bound holds for the whole call."""

from __future__ import annotations

import asyncio

MIN_LEFT_S = 0.001  # a step handed a spent deadline still gets a (tiny) positive timeout, not 0 or less


def deadline_in(timeout: float | None) -> float | None:
    """``timeout`` seconds from now on the running loop's clock; None: no deadline."""
    return None if timeout is None else asyncio.get_running_loop().time() + timeout


def time_left(deadline: float | None, at_least: float = MIN_LEFT_S) -> float | None:
    """Seconds until ``deadline`` (at least ``at_least``); None: no deadline."""
    return None if deadline is None else max(at_least, deadline - asyncio.get_running_loop().time())
