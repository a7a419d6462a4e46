"""Fault injection for the hf engine: a test hook, off unless ``ROLLWIRE_HF_FAULTS`` is set.

The only way to prove that a failing engine step costs just the request that caused it, and that
a dead worker fails every request with ``engine_dead``, is to make a real engine fail on demand
inside a real server process. The variable holds comma-separated faults:

* ``row:SUFFIX`` or ``row:SUFFIX@K`` -- a step (and the probe that isolates it) raises
  ``InjectedFault`` on the worker thread whenever it computes a request whose engine rid ends with
  ``SUFFIX`` (once it has K output tokens: mid-generation, its batch mates holding KV beside it).
  The GenerationActor names engine requests ``<connection>:<rid>:<sample>``, so ``row::7:0`` hits
  sample 0 of rid 7. The request's parameters are valid: only this hook makes it fail.
* ``worker:N`` -- after N steps the engine's worker pool is shut down, as a worker thread that
  died: the next step cannot run at all (a failure outside any one request). ``worker:PATH`` (a
  path, not a number): the same at the first step after the file PATH exists, so a test can let
  requests get in flight first.

Nothing here runs when the variable is unset (``Faults.parse`` returns None).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

ENV = "ROLLWIRE_HF_FAULTS"


class InjectedFault(RuntimeError):
    """Raised on the worker thread by a ``row:`` fault."""


@dataclass
class Faults:
    rows: tuple[tuple[str, int], ...] = ()  # (engine rid suffix, output tokens) whose steps raise
    kill_worker_after: int | None = None  # steps before the worker pool is shut down
    kill_worker_when: str = ""  # or: the worker dies once this file exists
    steps: int = field(default=0)

    @classmethod
    def parse(cls, spec: str | None = None) -> Faults | None:
        spec = os.environ.get(ENV, "") if spec is None else spec
        if not spec.strip():
            return None
        rows: list[tuple[str, int]] = []
        kill: int | None = None
        kill_when = ""
        for part in spec.split(","):
            kind, _, arg = part.strip().partition(":")
            if kind == "row" and arg:
                suffix, _, k = arg.rpartition("@") if "@" in arg else (arg, "", "0")
                rows.append((suffix, int(k)))
            elif kind == "worker" and arg.isdigit():
                kill = int(arg)
            elif kind == "worker" and arg:
                kill_when = arg
            else:
                raise ValueError(f"{ENV}: unknown fault {part!r} (row:SUFFIX[@K], worker:N or worker:PATH)")
        return cls(rows=tuple(rows), kill_worker_after=kill, kill_worker_when=kill_when)

    def check_rows(self, rows: Iterable[tuple[str, int]]) -> None:
        """Worker thread: raise if one of ``rows`` (engine rid, output tokens so far) is marked to fail."""
        for rid, produced in rows:
            if any(rid.endswith(suffix) and produced >= k for suffix, k in self.rows):
                raise InjectedFault(f"injected step failure for request {rid}")

    def worker_dies_now(self) -> bool:
        """Called once per launched step: True when the worker is to die before this step."""
        self.steps += 1
        if self.kill_worker_when:
            return os.path.exists(self.kill_worker_when)
        return self.kill_worker_after is not None and self.steps > self.kill_worker_after
