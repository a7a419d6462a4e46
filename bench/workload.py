"""What the closed-loop benchmarks ask for, shared so that every arm and bench asks the same."""

from __future__ import annotations

LENGTHS = ("mixed", "fixed")


def token_counts(max_tokens: int, lengths: str, n: int = 1024) -> list[int]:
    """New tokens for request ``i % n``: all ``max_tokens`` (fixed), or spread over
    [max_tokens/2, 3*max_tokens/2] by a fixed stride (mixed; mean ``max_tokens``).

    Fixed lengths put a closed loop in lock-step: every request of a batch ends in the same engine
    step, so the next ones reach the server together when the client answers at once (one prefill
    for all) but spread out when each reply costs the client or a proxy some work (a prefill each,
    every one a step the running batch waits for); that measures the engine's prefill scheduling as
    much as the path under test. Rollouts differ in length, hence mixed by default."""
    if lengths == "fixed":
        return [max_tokens] * n
    lo, span = max(1, max_tokens // 2), max_tokens + 1
    return [lo + (i * 37) % span for i in range(n)]
