"""Counters and gauges: plain numbers, cheap to bump, snapshotted into StatusReply."""

from __future__ import annotations

from collections import defaultdict


class Counters:
    __slots__ = ("_prefix", "_values")

    def __init__(self, prefix: str = "") -> None:
        self._prefix = prefix
        self._values: defaultdict[str, float] = defaultdict(float)

    def inc(self, name: str, by: float = 1.0) -> None:
        self._values[name] += by

    def set(self, name: str, value: float) -> None:
        self._values[name] = value

    def get(self, name: str) -> float:
        return self._values.get(name, 0.0)

    def snapshot(self) -> dict[str, float]:
        p = self._prefix
        return {f"{p}{k}": v for k, v in self._values.items()}
